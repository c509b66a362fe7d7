//! `pgha config show|edit|set`: the dynamic cluster configuration kept in
//! etcd, read and changed through a member's API.

use std::process::ExitCode;

use clap::Subcommand;

use super::cluster::operator;
use super::target::Target;

#[derive(Subcommand)]
pub(super) enum ConfigAction {
    /// Print the dynamic config.
    Show {
        #[command(flatten)]
        target: Target,
    },
    /// Edit the whole dynamic config in $VISUAL/$EDITOR (default vi); it is
    /// validated by the agent before it is written.
    Edit {
        #[command(flatten)]
        target: Target,
    },
    /// Change settings: `pgha config set maximum_lag_on_failover=16777216 paused=false`
    /// (`KEY=null` resets one to its default).
    Set {
        #[arg(required = true)]
        pairs: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
}

pub(super) async fn run(action: ConfigAction) -> ExitCode {
    match action {
        ConfigAction::Show { target } => show(&target).await,
        ConfigAction::Edit { target } => edit(&target).await,
        ConfigAction::Set { pairs, target } => set(&target, &pairs).await,
    }
}

/// `pgha config show`: pretty JSON.
async fn show(target: &Target) -> ExitCode {
    let api = match target.api() {
        Ok(a) => a,
        Err(code) => return code,
    };
    match crate::ctl::get_json(&api, "/config").await {
        Ok((200, c)) => {
            println!("{}", serde_json::to_string_pretty(&c).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok((status, c)) => {
            eprintln!("error: {status}: {c}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `pgha config edit`: the config as JSON in an editor, then `PUT /config`.
/// A file that does not parse is kept, and its path printed.
async fn edit(target: &Target) -> ExitCode {
    let api = match target.api() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let current = match crate::ctl::get_json(&api, "/config").await {
        Ok((200, c)) => c,
        Ok((status, c)) => {
            eprintln!("error: {status}: {c}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let before = serde_json::to_string_pretty(&current).unwrap_or_default() + "\n";
    let path = std::env::temp_dir().join(format!("pgha-config-{}.json", std::process::id()));
    if let Err(e) = std::fs::write(&path, &before) {
        eprintln!("error: {}: {e}", path.display());
        return ExitCode::from(1);
    }
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let editor = set("VISUAL")
        .or_else(|| set("EDITOR"))
        .unwrap_or_else(|| "vi".into());
    let mut words = editor.split_whitespace();
    let program = words.next().unwrap_or("vi");
    let status = std::process::Command::new(program)
        .args(words)
        .arg(&path)
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("error: the editor ({editor}) failed: {status:?}; nothing changed");
        let _ = std::fs::remove_file(&path);
        return ExitCode::from(1);
    }
    let after = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    if after.trim() == before.trim() {
        let _ = std::fs::remove_file(&path);
        eprintln!("no changes");
        return ExitCode::SUCCESS;
    }
    let doc: serde_json::Value = match serde_json::from_str(&after) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "error: {}: not valid JSON ({e}); nothing changed, your edit is kept there",
                path.display()
            );
            return ExitCode::from(2);
        }
    };
    let code = operator(target, None, hyper::Method::PUT, "/config", Some(doc)).await;
    if code == ExitCode::SUCCESS {
        let _ = std::fs::remove_file(&path);
    } else {
        eprintln!("your edit is kept in {}", path.display());
    }
    code
}

/// `pgha config set KEY=VALUE...`: one `PATCH /config`.
async fn set(target: &Target, pairs: &[String]) -> ExitCode {
    match crate::ctl::config_patch(pairs) {
        Ok(patch) => operator(target, None, hyper::Method::PATCH, "/config", Some(patch)).await,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
