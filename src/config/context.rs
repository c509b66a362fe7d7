//! What validation of every section shares: the file being read, the
//! variables that overrode keys, and the helpers that turn a problem into a
//! [`ConfigError`] naming the key (and the variable, when one set it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{ConfigError, Secret};

/// What validation needs to know besides the file struct.
pub(super) struct Context<'a> {
    pub(super) source: &'a Path,
    pub(super) base_dir: PathBuf,
    /// Key path → the `PGHA_*` variable that set it.
    pub(super) set_by: BTreeMap<String, String>,
}

impl Context<'_> {
    pub(super) fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
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

    /// An error about a value that came from `var`, a variable of the
    /// platform rather than a `PGHA_*` override.
    pub(super) fn invalid_from(
        &self,
        key: &str,
        var: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.to_owned(),
            key: key.to_owned(),
            env_var: Some(var.to_owned()),
            message: message.into(),
        }
    }

    /// A key the platform could not fill in.
    pub(super) fn problem(&self, key: &str, problem: super::identity::Problem) -> ConfigError {
        match problem.env_var {
            Some(var) => self.invalid_from(key, var, problem.message),
            None => self.invalid(key, problem.message),
        }
    }

    pub(super) fn resolve(&self, path: &str) -> PathBuf {
        let joined = self.base_dir.join(path);
        // `absolute` drops `.` components; `joined` is already absolute.
        std::path::absolute(&joined).unwrap_or(joined)
    }

    pub(super) fn serde_error(
        &self,
        err: &serde_path_to_error::Error<toml::de::Error>,
    ) -> ConfigError {
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
            let what = if ["etcd", "postgresql"].contains(&key.as_str()) {
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

pub(super) fn non_empty(cx: &Context<'_>, key: &str, value: String) -> Result<String, ConfigError> {
    if value.trim().is_empty() {
        Err(cx.invalid(key, "must not be empty"))
    } else {
        Ok(value)
    }
}

/// `password` or `password_file` of `section`; at most one may be set.
pub(super) fn secret(
    cx: &Context<'_>,
    section: &str,
    password: Option<String>,
    password_file: Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    secret_in(
        cx,
        (&format!("{section}.password"), password),
        (&format!("{section}.password_file"), password_file),
    )
}

/// A secret given inline (`value`: its key and value) or in a file
/// (`file`: its key and path); at most one may be set.
pub(super) fn secret_in(
    cx: &Context<'_>,
    value: (&str, Option<String>),
    file: (&str, Option<String>),
) -> Result<Option<Secret>, ConfigError> {
    let ((value_key, value), (file_key, file)) = (value, file);
    match (value, file) {
        (Some(_), Some(_)) => Err(cx.invalid(
            file_key,
            format!("conflicts with {value_key}: set only one of them"),
        )),
        (Some(value), None) if value.is_empty() => {
            Err(cx.invalid(value_key, "must not be empty (leave the key out instead)"))
        }
        (Some(value), None) => Ok(Some(Secret::new(value))),
        (None, Some(file)) => {
            let path = cx.resolve(&file);
            let text = std::fs::read_to_string(&path).map_err(|err| {
                cx.invalid(file_key, format!("cannot read {}: {err}", path.display()))
            })?;
            let secret = text.trim_end_matches(['\n', '\r']);
            if secret.is_empty() {
                return Err(cx.invalid(file_key, format!("{} is empty", path.display())));
            }
            Ok(Some(Secret::new(secret)))
        }
        (None, None) => Ok(None),
    }
}
