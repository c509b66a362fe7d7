//! The one error type of configuration loading: every message starts with
//! the file, then the key (or the `PGHA_*` variable that set it).

use std::path::PathBuf;

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
