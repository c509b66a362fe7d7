//! Backup commands: `pgha backup` (the leader begins a base backup; with
//! `--wait`, until it is in the repository), `pgha backups` (the
//! repository's list) and `pgha restore` (a copy of the cluster at a point in
//! time, into a new directory on this machine).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::load_config;
use super::target::Target;
use crate::backup::{Kind, Pgbackrest, Target as RestoreTarget};

/// `pgha backup`: sent to the current leader.
pub(super) async fn backup(target: &Target, kind: Kind, wait: Option<Duration>) -> ExitCode {
    let base = match target.api() {
        Ok(b) => b,
        Err(code) => return code,
    };
    let result = async {
        let leader = crate::ctl::current_leader(&base).await?;
        let api = crate::ctl::member_api(&base, &leader).await?;
        let before = labels(&api).await.unwrap_or_default();
        let body = serde_json::json!({ "type": kind });
        let (status, answer) = crate::ctl::send(
            &api,
            hyper::Method::POST,
            "/backup",
            Some(&body),
            target.token.as_deref(),
        )
        .await?;
        let message = answer["message"].as_str().unwrap_or_default().to_owned();
        if status != 202 {
            anyhow::bail!("{status}: {message}");
        }
        eprintln!("{message}");
        let Some(within) = wait else {
            return Ok(None);
        };
        let deadline = Instant::now() + within;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (_, list) = crate::ctl::get_json(&api, "/backups").await?;
            let task = &list["task"];
            if task["running"].is_null() {
                let new = list["backups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .rfind(|b| !before.contains(&b["label"].as_str().unwrap_or("").to_owned()))
                    .cloned();
                return match new {
                    Some(b) => Ok(Some(b)),
                    None => anyhow::bail!(
                        "the backup ended without a new backup in the repository: {}",
                        task["last_error"].as_str().unwrap_or("no error reported")
                    ),
                };
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "still running after {} (it goes on)",
                    humantime::format_duration(within)
                );
            }
        }
    }
    .await;
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(b)) => {
            if target.json {
                println!("{b}");
            } else {
                println!(
                    "{} {} {} .. {} ({} bytes)",
                    b["label"].as_str().unwrap_or(""),
                    b["type"].as_str().unwrap_or(""),
                    b["start"].as_str().unwrap_or(""),
                    b["stop"].as_str().unwrap_or(""),
                    b["size_bytes"]
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn labels(api: &str) -> anyhow::Result<Vec<String>> {
    let (_, list) = crate::ctl::get_json(api, "/backups").await?;
    Ok(list["backups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["label"].as_str().map(str::to_owned))
        .collect())
}

/// `pgha backups`: the list (`--json`: an array of backups).
pub(super) async fn list(target: &Target) -> ExitCode {
    let api = match target.api() {
        Ok(a) => a,
        Err(code) => return code,
    };
    match crate::ctl::get_json(&api, "/backups").await {
        Ok((200, list)) => {
            if target.json {
                println!("{}", list["backups"]);
            } else {
                print!("{}", render(&list));
            }
            ExitCode::SUCCESS
        }
        Ok((status, answer)) => {
            eprintln!(
                "error: {status}: {}",
                answer["message"].as_str().unwrap_or("")
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn render(list: &Value) -> String {
    let mut out = format!(
        "{:<34} {:<5} {:<21} {:<21} {:>12}  WAL\n",
        "LABEL", "TYPE", "START", "STOP", "SIZE"
    );
    for b in list["backups"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<34} {:<5} {:<21} {:<21} {:>12}  {}..{}\n",
            b["label"].as_str().unwrap_or(""),
            b["type"].as_str().unwrap_or(""),
            b["start"].as_str().unwrap_or(""),
            b["stop"].as_str().unwrap_or(""),
            b["size_bytes"].as_u64().unwrap_or(0),
            b["wal_start"].as_str().unwrap_or(""),
            b["wal_stop"].as_str().unwrap_or(""),
        ));
    }
    out.push_str(&format!(
        "archived WAL: {} .. {}\n",
        list["wal_min"].as_str().unwrap_or("-"),
        list["wal_max"].as_str().unwrap_or("-")
    ));
    if let Some(e) = list["task"]["last_error"].as_str() {
        out.push_str(&format!("last error: {e}\n"));
    }
    out
}

/// `pgha restore`: on this machine, from the repository of the node config
/// `config`, into `into` (new or empty; nothing else is touched).
pub(super) async fn restore(config: &Path, to: &str, into: &Path) -> ExitCode {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !cfg.backup.enabled {
        eprintln!(
            "error: {}: backup.enabled is false: no repository to restore from",
            config.display()
        );
        return ExitCode::from(2);
    }
    let into = match std::path::absolute(into) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {}: {e}", into.display());
            return ExitCode::from(2);
        }
    };
    if into.starts_with(&cfg.postgresql.data_dir) || cfg.postgresql.data_dir.starts_with(&into) {
        eprintln!(
            "error: --into {} overlaps this node's data directory {}: restore into a new directory",
            into.display(),
            cfg.postgresql.data_dir.display()
        );
        return ExitCode::from(2);
    }
    let target = RestoreTarget::parse(to);
    let pgbackrest = match Pgbackrest::new(&cfg.backup, &cfg.postgresql) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let began = Instant::now();
    match pgbackrest.restore(&into, &target).await {
        Ok(changed) => {
            println!(
                "restored into {} ({:?}) in {:.1} s",
                into.display(),
                target,
                began.elapsed().as_secs_f64()
            );
            for c in changed {
                println!("  {c}");
            }
            println!(
                "start it with: {} -D {} -o '-p PORT' start   (it recovers to the target, then promotes; it does not archive)",
                cfg.postgresql.bin_dir.join("pg_ctl").display(),
                into.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
