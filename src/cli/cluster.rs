//! Cluster commands: list the members, switch over, fail over, pause and
//! resume, restart/reload/reinit a member, history. Each is one request to a
//! member's API; `operator` sends it and prints the answer.

use std::process::ExitCode;

use super::target::Target;

/// Runs one operator request and prints its answer; exit 0 only on 2xx.
pub(super) async fn operator(
    target: &Target,
    node: Option<&str>,
    method: hyper::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> ExitCode {
    let base = match target.api() {
        Ok(b) => b,
        Err(code) => return code,
    };
    let result = async {
        let base = match node {
            Some(n) => crate::ctl::member_api(&base, n).await?,
            None => base,
        };
        crate::ctl::send(&base, method, path, body.as_ref(), target.token.as_deref()).await
    }
    .await;
    match result {
        Ok((status, answer)) => {
            if target.json {
                println!(
                    "{}",
                    serde_json::json!({ "status": status, "answer": answer })
                );
            } else {
                let text = answer["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| answer.to_string());
                println!("{status}: {text}");
            }
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `pgha list`: the members as a table, or JSON.
pub(super) async fn list(target: &Target) -> ExitCode {
    let api = match target.api() {
        Ok(a) => a,
        Err(code) => return code,
    };
    match crate::ctl::list(&api, target.json).await {
        Ok(out) => {
            print!("{out}");
            if !out.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `pgha switchover`: confirmed on a terminal unless `--force`; the current
/// leader is looked up when not given.
pub(super) async fn switchover(
    target: &Target,
    leader: Option<String>,
    to: Option<String>,
    at: Option<String>,
    cancel: bool,
    force: bool,
) -> ExitCode {
    if cancel {
        return operator(target, None, hyper::Method::DELETE, "/switchover", None).await;
    }
    if !force && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let whom = to.as_deref().unwrap_or("the best healthy replica");
        let when = at.as_deref().unwrap_or("now");
        eprint!("Switch over to {whom} ({when}), demoting the current leader? [y/N] ");
        let mut answer = String::new();
        if std::io::stdin().read_line(&mut answer).is_err()
            || !matches!(answer.trim(), "y" | "Y" | "yes")
        {
            eprintln!("not confirmed: nothing done (use --force to skip the question)");
            return ExitCode::from(1);
        }
    }
    // The API needs the current leader named: take it from the
    // cluster as read now, so a plain `pgha switchover` still works.
    let leader = match leader {
        Some(l) => l,
        None => {
            let base = match target.api() {
                Ok(b) => b,
                Err(code) => return code,
            };
            match crate::ctl::current_leader(&base).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(1);
                }
            }
        }
    };
    let mut body = serde_json::json!({ "leader": leader });
    if let Some(to) = to {
        body["candidate"] = to.into();
    }
    if let Some(at) = at {
        body["scheduled_at"] = at.into();
    }
    operator(target, None, hyper::Method::POST, "/switchover", Some(body)).await
}

/// `pgha reinit NODE`: asks for "yes" unless `--force`.
pub(super) async fn reinit(target: &Target, node: &str, force: bool) -> ExitCode {
    if !force {
        eprint!("Remove {node}'s data directory and clone it again? Type yes: ");
        let mut answer = String::new();
        if std::io::stdin().read_line(&mut answer).is_err() || answer.trim() != "yes" {
            eprintln!("not confirmed: nothing done (use --force to skip the question)");
            return ExitCode::from(1);
        }
    }
    operator(
        target,
        Some(node),
        hyper::Method::POST,
        "/reinitialize",
        None,
    )
    .await
}

/// `pgha history`: rendered as text, or JSON.
pub(super) async fn history(target: &Target) -> ExitCode {
    let api = match target.api() {
        Ok(a) => a,
        Err(code) => return code,
    };
    match crate::ctl::get_json(&api, "/history").await {
        Ok((_, h)) if target.json => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Ok((_, h)) => {
            print!("{}", crate::ctl::render_history(&h));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
