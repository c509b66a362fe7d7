//! Value types of the file shared by several sections: durations, ports,
//! sizes, string lists, postgresql.conf values. Each deserializes any TOML
//! value and converts it, so a message says what was expected and what was found.

use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use toml::Value;

/// Deserializes any TOML value and converts it, so that the message says
/// both what was expected and what was found.
pub(super) fn convert_value<'de, D, T>(
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
pub(super) fn describe(value: &Value) -> String {
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
pub(super) struct FileDuration(pub(super) Duration);

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

pub(super) struct Port(pub(super) u16);

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
pub(super) struct ByteSize(pub(super) u64);

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
pub(super) struct OneOrMany(pub(super) Vec<String>);

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
pub(super) struct ParameterValue(pub(super) String);

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
