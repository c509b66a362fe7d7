//! Reads the file, applies the environment, deserializes the file struct and
//! has each section validate itself into [`Config`]. It assembles sections;
//! it knows none of their keys beyond the top-level ones.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Value;

use super::api::FileApi;
use super::backup::FileBackup;
use super::cluster::FileCluster;
use super::context::Context;
use super::env::{apply_env, EnvKind, ProcessEnv};
use super::etcd::FileEtcd;
use super::identity::{self, Defaulted, Origin, Platform};
use super::log::FileLog;
use super::postgres::FilePostgres;
use super::router::FileRouter;
use super::tags::FileTags;
use super::timing::FileTiming;
use super::{Config, ConfigError, EnvSource};
use crate::net::IpFamily;

/// The top-level keys.
pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("scope", EnvKind::Text),
    ("name", EnvKind::Text),
    ("region", EnvKind::Text),
    ("ip_family", EnvKind::Text),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    scope: String,
    name: Option<String>,
    region: Option<String>,
    ip_family: Option<String>,
    etcd: FileEtcd,
    postgresql: FilePostgres,
    #[serde(default)]
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
    router: FileRouter,
    #[serde(default)]
    backup: FileBackup,
    #[serde(default)]
    tls: crate::tls::FileTls,
}

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
        file.validate(&cx, &Platform::from_env(env))
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

impl FileConfig {
    /// `platform` fills in the node's identity where the file (and the
    /// `PGHA_*` variables) leave it out.
    fn validate(self, cx: &Context<'_>, platform: &Platform) -> Result<Config, ConfigError> {
        let mut defaulted = Vec::new();
        let scope = plain_name(cx, "scope", self.scope, None)?;
        let name = match self.name {
            Some(name) => plain_name(cx, "name", name, None)?,
            None => {
                let (name, origin) =
                    identity::node_name(platform).map_err(|p| cx.problem("name", p))?;
                let name = plain_name(cx, "name", name, Some(origin))?;
                defaulted.push(Defaulted {
                    key: "name",
                    value: name.clone(),
                    origin,
                });
                name
            }
        };
        // An empty region (in the file or PGHA_REGION="") means none, not the platform's.
        let region = match self.region {
            Some(region) => Some(region).filter(|r| !r.is_empty()),
            None => identity::region(platform).map(|(region, origin)| {
                defaulted.push(Defaulted {
                    key: "region",
                    value: region.clone(),
                    origin,
                });
                region
            }),
        };
        let ip_family = match self.ip_family.as_deref().map(str::trim) {
            None => IpFamily::default(),
            Some(text) => IpFamily::parse(text).ok_or_else(|| {
                cx.invalid(
                    "ip_family",
                    format!("expected \"dual\", \"ipv6\" or \"ipv4\", got {text:?}"),
                )
            })?,
        };
        let etcd = self.etcd.validate(cx, &scope)?;
        let postgresql = self
            .postgresql
            .validate(cx, ip_family, platform, &mut defaulted)?;
        let api = self.api.validate(
            cx,
            ip_family,
            &postgresql.advertise_host,
            self.tls.serves_https_api(),
            &mut defaulted,
        )?;
        let mut config = Config {
            source: cx.source.to_owned(),
            ip_family,
            router: self.router.validate(cx, ip_family, &postgresql, &api)?,
            backup: self.backup.validate(cx, &scope, &postgresql)?,
            etcd,
            postgresql,
            api,
            timing: self.timing.validate(cx)?,
            cluster: self.cluster.validate(cx)?,
            tags: self.tags.validate(),
            log: self.log.validate(cx)?,
            tls: crate::tls::TlsConfig::disabled(),
            region,
            scope,
            name,
            identity_defaults: defaulted,
        };
        config.postgresql.archiving = config.backup.archiving();
        if config.postgresql.clone_from == super::CloneFrom::Backup && !config.backup.enabled {
            return Err(cx.invalid(
                "postgresql.clone_from",
                "\"backup\" needs backup.enabled = true and its repository",
            ));
        }
        // Last: [tls] checks names and addresses of the sections above.
        super::tls::validate(self.tls, &mut config, cx, platform)?;
        Ok(config)
    }
}

/// Scope and node names become etcd key segments and file names. `origin`
/// says where a name the file left out came from.
fn plain_name(
    cx: &Context<'_>,
    key: &str,
    value: String,
    origin: Option<Origin>,
) -> Result<String, ConfigError> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        return Ok(value);
    }
    let message = format!("expected letters, digits, '_', '.' or '-', got {value:?}");
    Err(match origin {
        None => cx.invalid(key, message),
        Some(Origin::Env(var)) => cx.invalid_from(key, var, message),
        Some(other) => cx.invalid(
            key,
            format!("not set, and {other} is not a usable name: {message}"),
        ),
    })
}
