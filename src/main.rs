//! The `pgha` binary: parses arguments, sets up logging, loads the config and
//! hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgha::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "pgha", version, about = "PostgreSQL high-availability agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent for this node.
    Run {
        #[arg(long, short, env = "PGHA_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file (and PGHA_* overrides) without starting anything.
    CheckConfig { file: PathBuf },
    /// Exit 0 when a health endpoint of the API answers 200, 1 otherwise
    /// (the container image's HEALTHCHECK).
    Health {
        /// API of the node to ask.
        #[arg(long, env = "PGHA_API_URL", default_value = "http://127.0.0.1:8008")]
        api: String,
        /// Endpoint: /health, /liveness, /readiness, /primary, /replica, ...
        #[arg(default_value = "/health")]
        path: String,
    },
    /// Internal: the fence guard the agent starts for itself.
    #[command(hide = true)]
    FenceGuard {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// List the cluster's members.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Planned switchover: the leader hands over to a healthy replica without
    /// losing a committed write. `--at` schedules it; `--cancel` cancels one.
    Switchover {
        #[command(flatten)]
        target: Target,
        /// The current leader (checked, optional).
        #[arg(long)]
        leader: Option<String>,
        /// The member to take over (default: the best healthy replica).
        #[arg(long, alias = "candidate")]
        to: Option<String>,
        /// When, as an RFC 3339 time such as 2026-11-26T03:00:00Z.
        #[arg(long)]
        at: Option<String>,
        /// Cancel a pending switchover instead.
        #[arg(long)]
        cancel: bool,
        /// Do not ask for confirmation (only asked on a terminal).
        #[arg(long)]
        force: bool,
    },
    /// Make NODE the leader. With a healthy primary this is a switchover,
    /// unless --force: then the primary is stopped and NODE promoted even if
    /// it lags, and writes the primary acknowledged that NODE had not received
    /// are LOST (the old primary is rewound).
    Failover {
        #[command(flatten)]
        target: Target,
        #[arg(long, alias = "candidate")]
        to: String,
        #[arg(long)]
        force: bool,
    },
    /// Maintenance mode: no automatic failover or restarts, cluster-wide.
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Leave maintenance mode.
    Resume {
        #[command(flatten)]
        target: Target,
    },
    /// Restart NODE's Postgres in its current role.
    Restart {
        node: String,
        #[command(flatten)]
        target: Target,
        /// Only if a changed setting waits for a restart (`pending_restart`).
        #[arg(long)]
        pending: bool,
    },
    /// Reload NODE's Postgres configuration.
    Reload {
        node: String,
        #[command(flatten)]
        target: Target,
    },
    /// Remove replica NODE's data directory and clone it again from the leader.
    Reinit {
        node: String,
        #[command(flatten)]
        target: Target,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Every failover and switchover: time, kind, timeline, old and new leader, reason.
    History {
        #[command(flatten)]
        target: Target,
    },
    /// Show or change the dynamic cluster configuration kept in etcd.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Certificates: create a cluster CA, issue an operator's client
    /// certificate, describe certificates.
    Certs {
        #[command(subcommand)]
        action: pgha::tls::cli::CertsAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
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

/// How the CLI finds and talks to the cluster.
#[derive(clap::Args)]
struct Target {
    /// API of any member; localhost is reached over IPv6 or IPv4, whichever answers.
    #[arg(long, env = "PGHA_API_URL", default_value = "http://localhost:8008")]
    api: String,
    /// Find the API through this node's config instead.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bearer token for operator requests.
    #[arg(long, env = "PGHA_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// CA certificate that verifies an https:// API (default with --config:
    /// the node's shared CA).
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Client certificate for operator endpoints that require one (with --key).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

impl Target {
    /// The API URL; also sets up how https:// URLs are verified.
    fn api(&self) -> Result<String, ExitCode> {
        let config = self.config.as_deref().map(load_config).transpose()?;
        let ca_pem = match (&self.cacert, &config) {
            (Some(path), _) => Some(read_pem(path)?),
            (None, Some(c)) => match &c.tls.ca {
                pgha::tls::CaSource::Shared { cert_pem, .. } => Some(cert_pem.clone()),
                pgha::tls::CaSource::Own => None,
            },
            (None, None) => None,
        };
        if let Some(ca_pem) = ca_pem {
            let identity = match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => Some((read_pem(cert)?, read_pem(key)?)),
                _ => None,
            };
            let identity = identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str()));
            if let Err(e) = pgha::tls::https::trust_for_api_clients(&ca_pem, identity) {
                eprintln!("error: {e}");
                return Err(ExitCode::from(2));
            }
        }
        match config {
            Some(c) => Ok(c.api.advertise_url),
            None => match pgha::net::HttpUrl::parse(&self.api) {
                Ok(_) => Ok(self.api.clone()),
                Err(why) => {
                    eprintln!("error: --api {:?}: {why}", self.api);
                    Err(ExitCode::from(2))
                }
            },
        }
    }
}

fn read_pem(path: &std::path::Path) -> Result<String, ExitCode> {
    std::fs::read_to_string(path).map_err(|e| {
        eprintln!("error: {}: {e}", path.display());
        ExitCode::from(2)
    })
}

/// Runs one operator request and prints its answer; exit 0 only on 2xx.
/// `pgha config edit`: the config as JSON in an editor, then `PUT /config`.
/// A file that does not parse is kept, and its path printed.
async fn config_edit(target: &Target) -> ExitCode {
    let api = match target.api() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let current = match pgha::ctl::get_json(&api, "/config").await {
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

async fn operator(
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
            Some(n) => pgha::ctl::member_api(&base, n).await?,
            None => base,
        };
        pgha::ctl::send(&base, method, path, body.as_ref(), target.token.as_deref()).await
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

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

async fn run(cfg: Config) -> ExitCode {
    init_tracing(cfg.log.format, &cfg.log.level);
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
        signals.cancel();
    });
    // Certificates before Postgres starts; a CA that went bad since the
    // config was read stops the start here, never a plaintext fallback.
    let tls = match pgha::tls::NodeTls::prepare(&cfg) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(node = %cfg.name, error = %e, "cannot set up TLS");
            return ExitCode::from(2);
        }
    };
    let mut api_tls = None;
    if let Some(tls) = &tls {
        if tls.config().shared_ca() {
            // Members ask each other's API (https:// with tls.api).
            if let Err(e) = pgha::tls::https::trust_for_api_clients(tls.ca_pem(), None) {
                tracing::error!(node = %cfg.name, error = %e, "cannot set up TLS");
                return ExitCode::from(2);
            }
        }
        api_tls = match tls.api_server() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(node = %cfg.name, error = %e, "cannot set up the HTTPS API");
                return ExitCode::from(2);
            }
        };
        tokio::spawn(tls.clone().rotate(shutdown.clone()));
    }
    let (agent, snapshots) = match pgha::agent::Agent::new(cfg.clone()).await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(node = %cfg.name, error = %e, "cannot start");
            return ExitCode::from(1);
        }
    };
    let stale_after = cfg.timing.ttl;
    let api_shutdown = CancellationToken::new();
    let operator = pgha::api::Operator {
        calls: agent.operator_handle(),
        auth: pgha::api::operator::Auth::from_config(&cfg.api),
        failsafe: agent.failsafe_promise(),
        failsafe_ttl: cfg.timing.ttl,
    };
    let api = tokio::spawn(pgha::api::serve_with_tls(
        cfg.api.listen.clone(),
        cfg.ip_family,
        snapshots,
        stale_after,
        Some(operator),
        api_tls,
        api_shutdown.clone(),
    ));
    let result = tokio::select! {
        r = agent.run(shutdown.clone()) => r,
        r = api => {
            tracing::error!(node = %cfg.name, result = ?r, "api server stopped");
            shutdown.cancel();
            return ExitCode::from(1);
        }
    };
    api_shutdown.cancel();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(node = %cfg.name, error = %e, "agent stopped");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    // The fence guard is plain synchronous code started by the agent with
    // exactly these arguments: no argument parser, no runtime, no worker
    // threads, the smallest footprint beside every primary.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let [cmd, flag, data_dir] = args.as_slice() {
        if cmd == "fence-guard" && flag == "--data-dir" {
            let data_dir = PathBuf::from(data_dir);
            let stdin = std::io::BufReader::new(std::io::stdin());
            pgha::fence::run_guard(stdin, &move || pgha::fence::postmaster_pid(&data_dir));
            return ExitCode::SUCCESS;
        }
    }
    let cli = Cli::parse();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(dispatch(cli.command)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run { config } => match load_config(&config) {
            // As a container's PID 1 the agent runs as a child of a reaper.
            Ok(cfg) if pgha::reaper::is_pid1() => {
                init_tracing(cfg.log.format, &cfg.log.level);
                pgha::reaper::supervise(std::env::args_os().skip(1).collect()).await
            }
            Ok(cfg) => run(cfg).await,
            Err(code) => code,
        },
        Command::Health { api, path } => match pgha::ctl::get_json(&api, &path).await {
            Ok((status, body)) => {
                println!("{status} {body}");
                if status == 200 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Certs { action } => match pgha::tls::cli::run(action) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        // Only reached with other arguments than the agent passes.
        Command::FenceGuard { .. } => {
            eprintln!("error: fence-guard takes exactly --data-dir DIR");
            ExitCode::from(2)
        }
        Command::CheckConfig { file } => match load_config(&file) {
            Ok(cfg) => {
                println!(
                    "config ok: scope={} name={} data_dir={} etcd={} api={}",
                    cfg.scope,
                    cfg.name,
                    cfg.postgresql.data_dir.display(),
                    cfg.etcd.endpoints.join(","),
                    cfg.api.advertise_url
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::List { target } => {
            let api = match target.api() {
                Ok(a) => a,
                Err(code) => return code,
            };
            match pgha::ctl::list(&api, target.json).await {
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
        Command::Switchover {
            target,
            leader,
            to,
            at,
            cancel,
            force,
        } => {
            if cancel {
                return operator(&target, None, hyper::Method::DELETE, "/switchover", None).await;
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
                    match pgha::ctl::current_leader(&base).await {
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
            operator(
                &target,
                None,
                hyper::Method::POST,
                "/switchover",
                Some(body),
            )
            .await
        }
        Command::Failover { target, to, force } => {
            let body = serde_json::json!({ "candidate": to, "force": force });
            operator(&target, None, hyper::Method::POST, "/failover", Some(body)).await
        }
        Command::Pause { target } => {
            operator(&target, None, hyper::Method::POST, "/pause", None).await
        }
        Command::Resume { target } => {
            operator(&target, None, hyper::Method::POST, "/resume", None).await
        }
        Command::Restart {
            node,
            target,
            pending,
        } => {
            let body = pending.then(|| serde_json::json!({ "restart_pending": true }));
            operator(&target, Some(&node), hyper::Method::POST, "/restart", body).await
        }
        Command::Reload { node, target } => {
            operator(&target, Some(&node), hyper::Method::POST, "/reload", None).await
        }
        Command::Reinit {
            node,
            target,
            force,
        } => {
            if !force {
                eprint!("Remove {node}'s data directory and clone it again? Type yes: ");
                let mut answer = String::new();
                if std::io::stdin().read_line(&mut answer).is_err() || answer.trim() != "yes" {
                    eprintln!("not confirmed: nothing done (use --force to skip the question)");
                    return ExitCode::from(1);
                }
            }
            operator(
                &target,
                Some(&node),
                hyper::Method::POST,
                "/reinitialize",
                None,
            )
            .await
        }
        Command::History { target } => {
            let api = match target.api() {
                Ok(a) => a,
                Err(code) => return code,
            };
            match pgha::ctl::get_json(&api, "/history").await {
                Ok((_, h)) if target.json => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Ok((_, h)) => {
                    print!("{}", pgha::ctl::render_history(&h));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Config {
            action: ConfigAction::Show { target },
        } => {
            let api = match target.api() {
                Ok(a) => a,
                Err(code) => return code,
            };
            match pgha::ctl::get_json(&api, "/config").await {
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
        Command::Config {
            action: ConfigAction::Edit { target },
        } => config_edit(&target).await,
        Command::Config {
            action: ConfigAction::Set { pairs, target },
        } => match pgha::ctl::config_patch(&pairs) {
            Ok(patch) => {
                operator(&target, None, hyper::Method::PATCH, "/config", Some(patch)).await
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}
