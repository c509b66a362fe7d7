//! The `[backup]` section: WAL archiving and base backups through pgBackRest,
//! driven by the agent (`crate::backup`). Off unless `enabled = true`; on, every
//! node archives while it is the primary and fetches WAL from the repository
//! while it is a replica, and the leader takes the scheduled backups.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::context::{secret_in, Context};
use super::env::EnvKind;
use super::postgres::{Archiving, PostgresConfig};
use super::values::{convert_value, describe, FileDuration};
use super::{ConfigError, Secret};

#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// Whether archiving and backups are on.
    pub enabled: bool,
    /// pgBackRest's stanza: one per cluster (default: the scope).
    pub stanza: String,
    /// A posix repository: a directory every node can reach (a shared
    /// volume, or one host in a local cluster).
    pub repo_path: PathBuf,
    /// Full backups kept; older ones, and the WAL only they need, expire.
    pub retention_full: u32,
    pub compress_type: Compress,
    /// Postgres' `archive_timeout`: a segment is archived at least this
    /// often while writes trickle in (the most WAL a total loss can cost).
    pub archive_timeout: Duration,
    /// How often the leader takes a full backup (`None`: only on request).
    pub full_every: Option<Duration>,
    /// How often it takes a differential one in between (`None`: never).
    pub diff_every: Option<Duration>,
    /// Repository encryption (aes-256-cbc) with this passphrase.
    pub cipher_pass: Option<Secret>,
    /// Parallel processes of a backup or restore.
    pub process_max: u32,
    /// The pgbackrest program.
    pub pgbackrest: PathBuf,
    /// Where the agent writes `pgbackrest.conf` and pgBackRest keeps its
    /// lock, log and spool files (outside the data directory).
    pub work_dir: PathBuf,
    /// A new cluster (not initialized in etcd) starts from the repository
    /// instead of initdb: "latest", a time or an LSN to recover to.
    pub bootstrap_from: Option<String>,
}

impl BackupConfig {
    /// The file the agent renders for pgBackRest.
    pub fn conf_file(&self) -> PathBuf {
        self.work_dir.join("pgbackrest.conf")
    }

    /// `pgbackrest --config=... --stanza=...`, quoted for a shell (Postgres
    /// runs archive_command and restore_command through `sh -c`).
    pub fn command_prefix(&self) -> String {
        format!(
            "{} --config={} --stanza={}",
            shell_quote(&self.pgbackrest.display().to_string()),
            shell_quote(&self.conf_file().display().to_string()),
            shell_quote(&self.stanza)
        )
    }

    /// Postgres' side of archiving, while backups are on.
    pub fn archiving(&self) -> Option<Archiving> {
        self.enabled.then(|| Archiving {
            archive_command: format!("{} archive-push %p", self.command_prefix()),
            restore_command: format!("{} archive-get %f \"%p\"", self.command_prefix()),
            archive_timeout: self.archive_timeout,
        })
    }
}

/// `s` as one shell word: as is when it is plainly safe, else in single
/// quotes (a quote inside becomes `'\''`).
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '=' | ':' | '+' | ',')
        });
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// pgBackRest's `compress-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    None,
    Gz,
    Lz4,
    Zst,
    Bz2,
}

impl Compress {
    pub fn as_str(self) -> &'static str {
        match self {
            Compress::None => "none",
            Compress::Gz => "gz",
            Compress::Lz4 => "lz4",
            Compress::Zst => "zst",
            Compress::Bz2 => "bz2",
        }
    }
}

const DEFAULT_RETENTION_FULL: u32 = 2;
/// Fly's own Postgres image archives at least once a minute too.
const DEFAULT_ARCHIVE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_FULL_EVERY: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_PROCESS_MAX: u32 = 2;

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("backup.enabled", EnvKind::Boolean),
    ("backup.stanza", EnvKind::Text),
    ("backup.repo_path", EnvKind::Text),
    ("backup.retention_full", EnvKind::Integer),
    ("backup.compress_type", EnvKind::Text),
    ("backup.archive_timeout", EnvKind::Text),
    ("backup.full_every", EnvKind::Text),
    ("backup.diff_every", EnvKind::Text),
    ("backup.cipher_pass", EnvKind::Text),
    ("backup.cipher_pass_file", EnvKind::Text),
    ("backup.process_max", EnvKind::Integer),
    ("backup.pgbackrest", EnvKind::Text),
    ("backup.work_dir", EnvKind::Text),
    ("backup.bootstrap_from", EnvKind::Text),
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBackup {
    enabled: Option<bool>,
    stanza: Option<String>,
    repo_path: Option<String>,
    retention_full: Option<Count>,
    compress_type: Option<FileCompress>,
    archive_timeout: Option<FileDuration>,
    full_every: Option<Every>,
    diff_every: Option<Every>,
    cipher_pass: Option<String>,
    cipher_pass_file: Option<String>,
    process_max: Option<Count>,
    pgbackrest: Option<String>,
    work_dir: Option<String>,
    bootstrap_from: Option<String>,
}

/// A whole number from 1 to 999.
struct Count(u32);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        convert_value(d, |value| {
            value
                .as_integer()
                .filter(|n| (1..=999).contains(n))
                .and_then(|n| u32::try_from(n).ok())
                .map(Count)
                .ok_or_else(|| {
                    format!(
                        "expected a whole number from 1 to 999, got {}",
                        describe(value)
                    )
                })
        })
    }
}

struct FileCompress(Compress);

impl<'de> Deserialize<'de> for FileCompress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        convert_value(d, |value| {
            let compress = match value.as_str().map(str::trim) {
                Some("none") => Compress::None,
                Some("gz") => Compress::Gz,
                Some("lz4") => Compress::Lz4,
                Some("zst") => Compress::Zst,
                Some("bz2") => Compress::Bz2,
                _ => {
                    return Err(format!(
                        "expected \"lz4\", \"zst\", \"gz\", \"bz2\" or \"none\", got {}",
                        describe(value)
                    ))
                }
            };
            Ok(FileCompress(compress))
        })
    }
}

/// A schedule interval: a duration of at least a minute, or "off".
struct Every(Option<Duration>);

impl<'de> Deserialize<'de> for Every {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        convert_value(d, |value| {
            let expected = || {
                format!(
                    "expected \"off\" or a duration of at least 1m, like \"24h\", got {}",
                    describe(value)
                )
            };
            match value.as_str().map(str::trim) {
                Some("off") => Ok(Every(None)),
                Some(text) => humantime::parse_duration(text)
                    .ok()
                    .filter(|d| *d >= Duration::from_secs(60))
                    .map(|d| Every(Some(d)))
                    .ok_or_else(expected),
                None => Err(expected()),
            }
        })
    }
}

impl FileBackup {
    pub(super) fn validate(
        self,
        cx: &Context<'_>,
        scope: &str,
        postgresql: &PostgresConfig,
    ) -> Result<BackupConfig, ConfigError> {
        let enabled = self.enabled.unwrap_or(false);
        let stanza = match self.stanza {
            None => scope.to_owned(),
            Some(s)
                if !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
            {
                s
            }
            Some(s) => {
                return Err(cx.invalid(
                    "backup.stanza",
                    format!("expected letters, digits, '_', '.' or '-', got {s:?}"),
                ))
            }
        };
        let repo_path = match self.repo_path {
            Some(p) if !p.trim().is_empty() => cx.resolve(p.trim()),
            Some(_) => return Err(cx.invalid("backup.repo_path", "must not be empty")),
            None if enabled => {
                return Err(cx.invalid(
                    "backup.repo_path",
                    "required with backup.enabled = true: the repository directory, e.g. \"/backup/pgha\"",
                ))
            }
            None => PathBuf::new(),
        };
        let data_dir = &postgresql.data_dir;
        if enabled && (repo_path.starts_with(data_dir) || data_dir.starts_with(&repo_path)) {
            return Err(cx.invalid(
                "backup.repo_path",
                format!(
                    "\"{}\" overlaps the data directory {} (postgresql.data_dir): a clone or rewind would take the repository with it",
                    repo_path.display(),
                    data_dir.display()
                ),
            ));
        }
        let work_dir = match self.work_dir {
            Some(p) => cx.resolve(p.trim()),
            None => data_dir
                .parent()
                .map_or_else(|| PathBuf::from("/"), |p| p.to_path_buf())
                .join("pgbackrest"),
        };
        if work_dir.starts_with(data_dir) {
            return Err(cx.invalid(
                "backup.work_dir",
                format!(
                    "\"{}\" is inside the data directory {}: pick a directory beside it",
                    work_dir.display(),
                    data_dir.display()
                ),
            ));
        }
        let archive_timeout = self
            .archive_timeout
            .map_or(DEFAULT_ARCHIVE_TIMEOUT, |d| d.0);
        if archive_timeout < Duration::from_secs(1) || archive_timeout.subsec_nanos() != 0 {
            return Err(cx.invalid(
                "backup.archive_timeout",
                "expected whole seconds, at least 1s (Postgres' archive_timeout counts seconds)",
            ));
        }
        let bootstrap_from = match self.bootstrap_from.map(|t| t.trim().to_owned()) {
            Some(t) if t.is_empty() => {
                return Err(cx.invalid(
                    "backup.bootstrap_from",
                    "expected \"latest\", a time like \"2026-12-08 10:00:00+00\" or an LSN like \"0/3000060\"",
                ))
            }
            Some(_) if !enabled => {
                return Err(cx.invalid(
                    "backup.bootstrap_from",
                    "needs backup.enabled = true and the repository to restore from",
                ))
            }
            other => other,
        };
        let cipher_pass = secret_in(
            cx,
            ("backup.cipher_pass", self.cipher_pass),
            ("backup.cipher_pass_file", self.cipher_pass_file),
        )?;
        Ok(BackupConfig {
            enabled,
            stanza,
            repo_path,
            retention_full: self.retention_full.map_or(DEFAULT_RETENTION_FULL, |c| c.0),
            compress_type: self.compress_type.map_or(Compress::Lz4, |c| c.0),
            archive_timeout,
            full_every: self.full_every.map_or(Some(DEFAULT_FULL_EVERY), |e| e.0),
            diff_every: self.diff_every.and_then(|e| e.0),
            cipher_pass,
            process_max: self.process_max.map_or(DEFAULT_PROCESS_MAX, |c| c.0),
            pgbackrest: PathBuf::from(self.pgbackrest.unwrap_or_else(|| "pgbackrest".into())),
            work_dir,
            bootstrap_from,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::Compress;
    use crate::config::testing::*;

    fn backup(lines: &str) -> String {
        format!("{}\n[backup]\n{lines}\n", minimal())
    }

    #[test]
    fn off_by_default_and_defaults_when_on() {
        let b = parse(&minimal()).unwrap().backup;
        assert!(!b.enabled);
        let b = parse(&backup("enabled = true\nrepo_path = \"/backup/pgha\""))
            .unwrap()
            .backup;
        assert!(b.enabled);
        assert_eq!(b.stanza, "demo");
        assert_eq!(b.repo_path, PathBuf::from("/backup/pgha"));
        assert_eq!(b.retention_full, 2);
        assert_eq!(b.compress_type, Compress::Lz4);
        assert_eq!(b.archive_timeout, Duration::from_secs(60));
        assert_eq!(b.full_every, Some(Duration::from_secs(86400)));
        assert_eq!(b.diff_every, None);
        assert!(b.cipher_pass.is_none());
        assert_eq!(b.work_dir, PathBuf::from("/var/lib/pgha/n1/pgbackrest"));
        assert_eq!(
            b.conf_file(),
            PathBuf::from("/var/lib/pgha/n1/pgbackrest/pgbackrest.conf")
        );
    }

    #[test]
    fn archiving_goes_through_pgbackrest_with_quoted_paths() {
        let cfg = parse(&backup(
            "enabled = true\nrepo_path = \"/r\"\nwork_dir = \"/var/lib/my pgha\"",
        ))
        .unwrap();
        let a = cfg.postgresql.archiving.expect("archiving on");
        assert_eq!(
            a.archive_command,
            "pgbackrest --config='/var/lib/my pgha/pgbackrest.conf' --stanza=demo archive-push %p"
        );
        assert_eq!(
            a.restore_command,
            "pgbackrest --config='/var/lib/my pgha/pgbackrest.conf' --stanza=demo archive-get %f \"%p\""
        );
        assert_eq!(super::shell_quote("it's"), "'it'\\''s'");
        assert!(parse(&minimal()).unwrap().postgresql.archiving.is_none());
    }

    #[test]
    fn every_key_is_read_from_the_file_and_the_environment() {
        let b = parse(&backup(
            "enabled = true\nstanza = \"main\"\nrepo_path = \"/r\"\nretention_full = 7\n\
             compress_type = \"zst\"\narchive_timeout = \"30s\"\nfull_every = \"off\"\n\
             diff_every = \"6h\"\ncipher_pass = \"s3cret\"\nprocess_max = 4\n\
             pgbackrest = \"/opt/pgbackrest\"\nwork_dir = \"/w\"",
        ))
        .unwrap()
        .backup;
        assert_eq!(b.stanza, "main");
        assert_eq!(b.retention_full, 7);
        assert_eq!(b.compress_type, Compress::Zst);
        assert_eq!(b.archive_timeout, Duration::from_secs(30));
        assert_eq!(b.full_every, None);
        assert_eq!(b.diff_every, Some(Duration::from_secs(6 * 3600)));
        assert_eq!(b.cipher_pass.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(b.process_max, 4);
        assert_eq!(b.pgbackrest, PathBuf::from("/opt/pgbackrest"));
        assert_eq!(b.work_dir, PathBuf::from("/w"));
        let b = parse_env(
            &minimal(),
            &[
                ("PGHA_BACKUP_ENABLED", "true"),
                ("PGHA_BACKUP_REPO_PATH", "/from/env"),
                ("PGHA_BACKUP_RETENTION_FULL", "3"),
                ("PGHA_BACKUP_FULL_EVERY", "12h"),
                ("PGHA_BACKUP_CIPHER_PASS", "env-secret"),
            ],
        )
        .unwrap()
        .backup;
        assert!(b.enabled);
        assert_eq!(b.repo_path, PathBuf::from("/from/env"));
        assert_eq!(b.retention_full, 3);
        assert_eq!(b.full_every, Some(Duration::from_secs(12 * 3600)));
        assert_eq!(b.cipher_pass.unwrap().expose(), "env-secret");
    }

    #[test]
    fn bad_values_name_the_key_and_what_was_expected() {
        for (lines, key, expected) in [
            ("enabled = true", "backup.repo_path", "required"),
            (
                "enabled = true\nrepo_path = \"/var/lib/pgha/n1/data/backup\"",
                "backup.repo_path",
                "overlaps the data directory",
            ),
            (
                "work_dir = \"/var/lib/pgha/n1/data/pgbr\"",
                "backup.work_dir",
                "inside the data directory",
            ),
            ("retention_full = 0", "backup.retention_full", "1 to 999"),
            (
                "retention_full = \"2\"",
                "backup.retention_full",
                "got \"2\"",
            ),
            ("compress_type = \"xz\"", "backup.compress_type", "\"lz4\""),
            ("full_every = \"10s\"", "backup.full_every", "at least 1m"),
            ("diff_every = \"daily\"", "backup.diff_every", "\"off\""),
            (
                "archive_timeout = \"500ms\"",
                "backup.archive_timeout",
                "whole seconds",
            ),
            ("stanza = \"a b\"", "backup.stanza", "expected letters"),
            (
                "cipher_pass = \"x\"\ncipher_pass_file = \"/nope\"",
                "backup.cipher_pass_file",
                "conflicts with backup.cipher_pass",
            ),
            (
                "cipher_pass_file = \"/nonexistent/pass\"",
                "backup.cipher_pass_file",
                "cannot read",
            ),
            ("repo = \"/r\"", "backup.repo", "unknown key"),
            (
                "bootstrap_from = \"latest\"",
                "backup.bootstrap_from",
                "needs backup.enabled",
            ),
            (
                "enabled = true\nrepo_path = \"/r\"\nbootstrap_from = \" \"",
                "backup.bootstrap_from",
                "expected \"latest\"",
            ),
        ] {
            let message = assert_key(parse(&backup(lines)), key);
            assert!(message.contains(expected), "{lines}: {message}");
        }
        let message = assert_key_env(
            parse_env(&minimal(), &[("PGHA_BACKUP_FULL_EVERY", "soon")]),
            "backup.full_every",
            "PGHA_BACKUP_FULL_EVERY",
        );
        assert!(message.contains("\"off\""), "{message}");
    }
}
