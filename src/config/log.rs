//! The `[log]` section: output format and `tracing` filter.

use serde::{Deserialize, Deserializer};

use super::context::{non_empty, Context};
use super::env::EnvKind;
use super::values::{convert_value, describe};
use super::ConfigError;

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

const DEFAULT_LOG_LEVEL: &str = "info";

pub(super) const KEYS: &[(&str, EnvKind)] =
    &[("log.format", EnvKind::Text), ("log.level", EnvKind::Text)];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLog {
    format: Option<FileLogFormat>,
    level: Option<String>,
}

pub(super) struct FileLogFormat(pub(super) LogFormat);

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

impl FileLog {
    pub(super) fn validate(self, cx: &Context<'_>) -> Result<LogConfig, ConfigError> {
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
