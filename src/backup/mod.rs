//! Backups and WAL archiving through pgBackRest (tested against Debian's
//! 2.45). This module is the one adapter: it renders `pgbackrest.conf`, runs
//! the `pgbackrest` program as the Postgres OS user and parses its JSON. The
//! agent's side (who backs up, when, one at a time across the cluster) is in
//! [`task`]; Postgres' side (archive_command, restore_command) in
//! `config::BackupConfig::archiving`.

pub mod task;

use std::fmt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{BackupConfig, PostgresConfig};
use crate::postgres::RunAs;

pub use task::{BackupHandle, BackupStatus};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// pgbackrest ran and failed; `stderr` carries its own message (error
    /// code and text), which names the problem: a wrong passphrase, a
    /// stanza of another cluster, an unreachable repository.
    #[error("pgbackrest {command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("pgbackrest {command} did not finish within {}", humantime::format_duration(*.within))]
    TimedOut { command: String, within: Duration },
    #[error("reading pgbackrest info: {0}")]
    Parse(String),
    #[error("{0}")]
    Refused(String),
}

/// pgBackRest's backup types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Full,
    Diff,
    Incr,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Diff => "diff",
            Kind::Incr => "incr",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "full" => Some(Kind::Full),
            "diff" => Some(Kind::Diff),
            "incr" => Some(Kind::Incr),
            _ => None,
        }
    }

    pub const ALL: [Kind; 3] = [Kind::Full, Kind::Diff, Kind::Incr];
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One backup in the repository, as `pgha backups --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub label: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// RFC 3339, UTC, whole seconds.
    pub start: String,
    pub stop: String,
    pub start_epoch: u64,
    pub stop_epoch: u64,
    /// The WAL segments the backup needs to be consistent.
    pub wal_start: String,
    pub wal_stop: String,
    pub lsn_start: Option<String>,
    pub lsn_stop: Option<String>,
    /// The database's size (what a restore writes).
    pub size_bytes: u64,
    /// What the backup takes in the repository (compressed, deduplicated).
    pub repo_size_bytes: u64,
    /// The backup a diff or incr builds on.
    pub prior: Option<String>,
}

/// What `pgbackrest info` says of the stanza besides its backups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct RepoInfo {
    pub backups: Vec<BackupInfo>,
    /// Oldest and newest archived segment of the current database.
    pub wal_min: Option<String>,
    pub wal_max: Option<String>,
    /// pgBackRest's status code and message (0 "ok"; 1 "missing stanza
    /// path", 2 "no valid backups", ...).
    pub status_code: i64,
    pub status_message: String,
}

/// How `pgha restore` picks the point to recover to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The end of the archived WAL.
    Latest,
    /// A time pgBackRest and Postgres parse (`2026-12-08 10:00:00+00`).
    Time(String),
    /// A WAL position (`0/3000060`).
    Lsn(String),
}

impl Target {
    /// `latest`, an LSN (`X/Y` in hex) or else a time.
    pub fn parse(text: &str) -> Target {
        let t = text.trim();
        let is_lsn = t.split_once('/').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.chars().all(|c| c.is_ascii_hexdigit())
                && b.chars().all(|c| c.is_ascii_hexdigit())
        });
        if t == "latest" {
            Target::Latest
        } else if is_lsn {
            Target::Lsn(t.to_owned())
        } else {
            Target::Time(t.to_owned())
        }
    }
}

/// The `pgbackrest` program with this node's configuration.
#[derive(Debug, Clone)]
pub struct Pgbackrest {
    cfg: BackupConfig,
    pg: PostgresConfig,
    run_as: RunAs,
}

/// The longest a command that should answer at once may take (info,
/// stanza-create); a backup or restore has no limit but its job's.
const QUICK: Duration = Duration::from_secs(120);

impl Pgbackrest {
    pub fn new(cfg: &BackupConfig, pg: &PostgresConfig) -> Result<Pgbackrest, BackupError> {
        let run_as = RunAs::for_user(&pg.os_user).map_err(BackupError::Refused)?;
        Ok(Pgbackrest {
            cfg: cfg.clone(),
            pg: pg.clone(),
            run_as,
        })
    }

    pub fn config(&self) -> &BackupConfig {
        &self.cfg
    }

    /// `pgbackrest.conf`: the repository, retention, compression and this
    /// node's Postgres (over its Unix socket, as the superuser).
    pub fn render_conf(&self) -> String {
        let c = &self.cfg;
        let work = |sub: &str| c.work_dir.join(sub).display().to_string();
        let mut s = String::from(
            "# Written by pgha on every start: edits here are overwritten.\n[global]\n",
        );
        let mut line = |k: &str, v: &str| s.push_str(&format!("{k}={v}\n"));
        line("repo1-path", &c.repo_path.display().to_string());
        line("repo1-retention-full", &c.retention_full.to_string());
        if let Some(pass) = &c.cipher_pass {
            line("repo1-cipher-type", "aes-256-cbc");
            line("repo1-cipher-pass", pass.expose());
        }
        line("compress-type", c.compress_type.as_str());
        line("process-max", &c.process_max.to_string());
        line("log-path", &work("log"));
        line("lock-path", &work("lock"));
        line("spool-path", &work("spool"));
        line("log-level-console", "warn");
        line("log-level-stderr", "error");
        line("log-level-file", "info");
        // A backup begins with an immediate checkpoint, not a spread one.
        line("start-fast", "y");
        // archive_command is the only writer of WAL; a full pg_wal never
        // makes pgBackRest drop segments (archive-push-queue-max unset).
        s.push_str(&format!("\n[{}]\n", c.stanza));
        let pg = &self.pg;
        let mut line = |k: &str, v: &str| s.push_str(&format!("{k}={v}\n"));
        line("pg1-path", &pg.data_dir.display().to_string());
        line("pg1-port", &pg.port.to_string());
        line("pg1-socket-path", &pg.socket_dir.display().to_string());
        line("pg1-user", &pg.superuser.username);
        s
    }

    /// Creates the work directory and the repository directory when they are
    /// missing (never removing anything), and writes `pgbackrest.conf` (0600:
    /// it may hold the passphrase).
    pub fn prepare(&self) -> Result<(), BackupError> {
        let c = &self.cfg;
        for (dir, mode) in [
            (c.work_dir.clone(), 0o700),
            (c.work_dir.join("log"), 0o700),
            (c.work_dir.join("lock"), 0o700),
            (c.work_dir.join("spool"), 0o700),
            (c.repo_path.clone(), 0o750),
        ] {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(mode)
                    .create(&dir)
                    .map_err(io(format!("creating {}", dir.display())))?;
                self.run_as
                    .chown(&dir)
                    .map_err(io(format!("chown {}", dir.display())))?;
            }
        }
        let conf = c.conf_file();
        let tmp = conf.with_extension("pgha-tmp");
        std::fs::write(&tmp, self.render_conf())
            .map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("chmod {}", tmp.display())))?;
        self.run_as
            .chown(&tmp)
            .map_err(io(format!("chown {}", tmp.display())))?;
        std::fs::rename(&tmp, &conf).map_err(io(format!("writing {}", conf.display())))
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = self.run_as.command(&self.cfg.pgbackrest);
        cmd.arg(format!("--config={}", self.cfg.conf_file().display()))
            .arg(format!("--stanza={}", self.cfg.stanza))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    }

    /// Runs `pgbackrest ARGS` and returns its standard output.
    pub async fn run(
        &self,
        args: &[&str],
        within: Option<Duration>,
    ) -> Result<String, BackupError> {
        let command = args.first().copied().unwrap_or_default().to_owned();
        let child = self.command(args).output();
        let out = match within {
            Some(limit) => {
                tokio::time::timeout(limit, child)
                    .await
                    .map_err(|_| BackupError::TimedOut {
                        command: command.clone(),
                        within: limit,
                    })?
            }
            None => child.await,
        }
        .map_err(io(format!("running {}", self.cfg.pgbackrest.display())))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let said = if stderr.trim().is_empty() {
                stdout
            } else {
                stderr
            };
            return Err(BackupError::Failed {
                command,
                status: out.status.to_string(),
                stderr: said.trim().lines().collect::<Vec<_>>().join(" / "),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates the stanza, or checks that the existing one belongs to this
    /// cluster's database: pgBackRest refuses a repository whose stanza
    /// was made for another system identifier, and nothing is removed.
    pub async fn stanza_create(&self) -> Result<(), BackupError> {
        self.run(&["stanza-create"], Some(QUICK)).await.map(drop)
    }

    /// A base backup from this node's Postgres (the primary).
    pub async fn backup(&self, kind: Kind) -> Result<(), BackupError> {
        let kind = format!("--type={kind}");
        self.run(&["backup", &kind], None).await.map(drop)
    }

    /// The stanza's backups and archive range.
    pub async fn info(&self) -> Result<RepoInfo, BackupError> {
        let text = self.run(&["info", "--output=json"], Some(QUICK)).await?;
        parse_info(&text, &self.cfg.stanza)
    }

    /// Restores into `into` (which must not exist or be empty), recovering to
    /// `target` on the latest timeline and then promoting; the restored
    /// Postgres does not archive (it must not write into this cluster's
    /// stanza). Returns what it changed beyond pgBackRest's restore.
    pub async fn restore(&self, into: &Path, target: &Target) -> Result<Vec<String>, BackupError> {
        refuse_unless_empty(into, "restore into a new directory (nothing was changed)")?;
        if !into.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(into)
                .map_err(io(format!("creating {}", into.display())))?;
        }
        self.run_as
            .chown(into)
            .map_err(io(format!("chown {}", into.display())))?;
        self.restore_into(into, target, false).await?;
        self.localize_restored(into)
    }

    /// Restores this node's own (empty) data directory for a new cluster
    /// that starts from the repository: it keeps archiving into the stanza,
    /// on the timeline its promotion begins.
    pub async fn restore_for_bootstrap(&self, target: &Target) -> Result<(), BackupError> {
        let into = &self.pg.data_dir;
        refuse_unless_empty(
            into,
            "a bootstrap from the repository needs an empty data directory",
        )?;
        self.restore_into(into, target, true).await
    }

    /// Restores this node's own (empty) data directory as a standby of the
    /// cluster from the newest backup: it then replays the archive and
    /// streams from the primary, which serves only what is newer.
    pub async fn restore_for_standby(&self) -> Result<(), BackupError> {
        refuse_unless_empty(
            &self.pg.data_dir,
            "a clone from the repository needs an empty data directory",
        )?;
        let info = self.info().await?;
        if info.backups.is_empty() {
            return Err(BackupError::Refused(
                "the repository holds no backup yet".into(),
            ));
        }
        let path = format!("--pg1-path={}", self.pg.data_dir.display());
        self.run(
            &[
                "restore",
                &path,
                "--type=standby",
                "--target-timeline=latest",
            ],
            None,
        )
        .await
        .map(drop)
    }

    async fn restore_into(
        &self,
        into: &Path,
        target: &Target,
        archive: bool,
    ) -> Result<(), BackupError> {
        let path = format!("--pg1-path={}", into.display());
        let mut args = vec![
            "restore".to_owned(),
            path,
            "--target-timeline=latest".to_owned(),
        ];
        if !archive {
            args.push("--archive-mode=off".to_owned());
        }
        match target {
            Target::Latest => args.push("--type=default".into()),
            Target::Time(t) => {
                args.extend(["--type=time".into(), format!("--target={t}")]);
                args.push("--target-action=promote".into());
            }
            Target::Lsn(l) => {
                args.extend(["--type=lsn".into(), format!("--target={l}")]);
                args.push("--target-action=promote".into());
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&args, None).await.map(drop)
    }

    /// The restored files are this cluster's: point the files Postgres reads
    /// at the new directory, and drop what only made sense in the cluster
    /// (its synchronous standbys: the copy would wait for them forever).
    fn localize_restored(&self, into: &Path) -> Result<Vec<String>, BackupError> {
        let mut changed = Vec::new();
        let conf = into.join("postgresql.conf");
        if let Ok(text) = std::fs::read_to_string(&conf) {
            let own = |name: &str| format!("'{}'", into.join(name).display());
            let mut out = String::new();
            for line in text.lines() {
                let key = line.split('=').next().unwrap_or("").trim();
                let replaced = match key {
                    "hba_file" => Some(format!("hba_file = {}", own("pg_hba.conf"))),
                    "ident_file" => Some(format!("ident_file = {}", own("pg_ident.conf"))),
                    // The restored copy is not a member: it never follows one.
                    "primary_conninfo" => Some("primary_conninfo = ''".to_owned()),
                    "primary_slot_name" => Some("primary_slot_name = ''".to_owned()),
                    _ => None,
                };
                match replaced {
                    Some(r) => {
                        changed.push(format!("postgresql.conf: {r}"));
                        out.push_str(&r);
                    }
                    None => out.push_str(line),
                }
                out.push('\n');
            }
            std::fs::write(&conf, out).map_err(io(format!("writing {}", conf.display())))?;
        }
        let sync = into.join(crate::postgres::conf::SYNC_CONF);
        if sync.exists() {
            std::fs::write(
                &sync,
                "# emptied by pgha restore: no synchronous standbys\n",
            )
            .map_err(io(format!("writing {}", sync.display())))?;
            changed.push(format!(
                "{}: no synchronous standbys",
                crate::postgres::conf::SYNC_CONF
            ));
        }
        // No standby.signal: pgBackRest wrote recovery.signal for the target.
        let standby = into.join("standby.signal");
        if standby.exists() {
            std::fs::remove_file(&standby)
                .map_err(io(format!("removing {}", standby.display())))?;
            changed.push("standby.signal removed (recovery.signal stays)".into());
        }
        Ok(changed)
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> BackupError {
    move |source| BackupError::Io { what, source }
}

/// Refuses a directory that holds anything (a missing one is empty): a
/// restore never writes over files.
fn refuse_unless_empty(dir: &Path, why: &str) -> Result<(), BackupError> {
    let empty = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
    };
    if empty {
        Ok(())
    } else {
        Err(BackupError::Refused(format!(
            "{} is not empty: {why}",
            dir.display()
        )))
    }
}

/// Parses `pgbackrest info --output=json` for `stanza`.
pub fn parse_info(text: &str, stanza: &str) -> Result<RepoInfo, BackupError> {
    let all: Value = serde_json::from_str(text).map_err(|e| BackupError::Parse(e.to_string()))?;
    let entry = all
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == stanza))
        .ok_or_else(|| BackupError::Parse(format!("no stanza {stanza:?} in the output")))?;
    let text_of = |v: &Value| v.as_str().map(str::to_owned);
    let mut backups = Vec::new();
    for b in entry["backup"].as_array().into_iter().flatten() {
        let field = |path: &[&str]| path.iter().fold(b, |v, k| &v[*k]);
        let missing = |what: &str| BackupError::Parse(format!("a backup without {what}"));
        let kind = field(&["type"])
            .as_str()
            .and_then(Kind::parse)
            .ok_or_else(|| missing("a type"))?;
        let start_epoch = field(&["timestamp", "start"])
            .as_u64()
            .ok_or_else(|| missing("a start time"))?;
        let stop_epoch = field(&["timestamp", "stop"])
            .as_u64()
            .ok_or_else(|| missing("a stop time"))?;
        backups.push(BackupInfo {
            label: text_of(field(&["label"])).ok_or_else(|| missing("a label"))?,
            kind,
            start: rfc3339(start_epoch),
            stop: rfc3339(stop_epoch),
            start_epoch,
            stop_epoch,
            wal_start: text_of(field(&["archive", "start"])).unwrap_or_default(),
            wal_stop: text_of(field(&["archive", "stop"])).unwrap_or_default(),
            lsn_start: text_of(field(&["lsn", "start"])),
            lsn_stop: text_of(field(&["lsn", "stop"])),
            size_bytes: field(&["info", "size"]).as_u64().unwrap_or(0),
            repo_size_bytes: field(&["info", "repository", "size"]).as_u64().unwrap_or(0),
            prior: text_of(field(&["prior"])),
        });
    }
    let current_db = entry["db"]
        .as_array()
        .and_then(|dbs| dbs.iter().filter_map(|d| d["id"].as_i64()).max());
    let archive = entry["archive"].as_array().and_then(|a| {
        a.iter()
            .find(|x| current_db.is_some() && x["database"]["id"].as_i64() == current_db)
    });
    Ok(RepoInfo {
        backups,
        wal_min: archive.and_then(|a| text_of(&a["min"])),
        wal_max: archive.and_then(|a| text_of(&a["max"])),
        status_code: entry["status"]["code"].as_i64().unwrap_or(-1),
        status_message: text_of(&entry["status"]["message"]).unwrap_or_default(),
    })
}

fn rfc3339(epoch: u64) -> String {
    crate::clock::rfc3339_ms(epoch.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stanza as pgBackRest 2.45 prints it (trimmed to the fields read).
    const INFO: &str = r#"[{"archive":[{"database":{"id":1,"repo-key":1},"id":"15-1",
        "max":"000000020000000000000005","min":"000000010000000000000001"}],
        "backup":[{"archive":{"start":"000000010000000000000002","stop":"000000010000000000000002"},
        "info":{"delta":22992563,"repository":{"delta":4522356,"size":4522356},"size":22992563},
        "label":"20261208-015747F","lsn":{"start":"0/2000028","stop":"0/2000100"},"prior":null,
        "timestamp":{"start":1796695067,"stop":1796695070},"type":"full"},
        {"archive":{"start":"000000020000000000000004","stop":"000000020000000000000004"},
        "info":{"size":22992563,"repository":{"size":9000}},
        "label":"20261208-015747F_20261208-020000D","prior":"20261208-015747F",
        "timestamp":{"start":1796695200,"stop":1796695201},"type":"diff"}],
        "db":[{"id":1,"system-id":7716746547829789491,"version":"15"}],
        "name":"demo","status":{"code":0,"message":"ok"}}]"#;

    #[test]
    fn info_json_gives_labels_types_times_wal_and_sizes() {
        let info = parse_info(INFO, "demo").unwrap();
        assert_eq!(info.backups.len(), 2);
        let full = &info.backups[0];
        assert_eq!(full.label, "20261208-015747F");
        assert_eq!(full.kind, Kind::Full);
        assert_eq!(full.start_epoch, 1796695067);
        assert!(full.start.ends_with('Z'), "{}", full.start);
        assert_eq!(full.wal_start, "000000010000000000000002");
        assert_eq!(full.size_bytes, 22992563);
        assert_eq!(full.repo_size_bytes, 4522356);
        assert_eq!(full.prior, None);
        let diff = &info.backups[1];
        assert_eq!(diff.kind, Kind::Diff);
        assert_eq!(diff.prior.as_deref(), Some("20261208-015747F"));
        assert_eq!(info.wal_max.as_deref(), Some("000000020000000000000005"));
        assert_eq!((info.status_code, info.status_message.as_str()), (0, "ok"));
        let json = serde_json::to_value(full).unwrap();
        for key in [
            "label",
            "type",
            "start",
            "stop",
            "wal_start",
            "wal_stop",
            "size_bytes",
        ] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
        assert!(parse_info(INFO, "other").is_err());
        assert!(parse_info("not json", "demo").is_err());
    }

    #[test]
    fn targets_are_latest_an_lsn_or_a_time() {
        assert_eq!(Target::parse("latest"), Target::Latest);
        assert_eq!(Target::parse("0/3000060"), Target::Lsn("0/3000060".into()));
        assert_eq!(
            Target::parse("2026-12-08 10:00:00+00"),
            Target::Time("2026-12-08 10:00:00+00".into())
        );
    }
}
