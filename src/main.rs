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
    /// Internal: the fence guard the agent starts for itself.
    #[command(hide = true)]
    FenceGuard {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// List the cluster's members.
    List {
        /// API of any member.
        #[arg(
            long,
            env = "PGHA_API_URL",
            default_value = "http://127.0.0.1:8008",
            conflicts_with = "config"
        )]
        api: String,
        /// Find the API through this node's config instead.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
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
    let (agent, snapshots) = match pgha::agent::Agent::new(cfg.clone()).await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(node = %cfg.name, error = %e, "cannot start");
            return ExitCode::from(1);
        }
    };
    let stale_after = cfg.timing.ttl;
    let api_shutdown = CancellationToken::new();
    let api = tokio::spawn(pgha::api::serve(
        cfg.api.listen.clone(),
        snapshots,
        stale_after,
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => match load_config(&config) {
            Ok(cfg) => run(cfg).await,
            Err(code) => code,
        },
        Command::FenceGuard { data_dir } => {
            let stdin = std::io::BufReader::new(std::io::stdin());
            pgha::fence::run_guard(stdin, &move || pgha::fence::postmaster_pid(&data_dir));
            ExitCode::SUCCESS
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
        Command::List { api, config, json } => {
            let api = match config {
                Some(path) => match load_config(&path) {
                    Ok(cfg) => cfg.api.advertise_url,
                    Err(code) => return code,
                },
                None => api,
            };
            match pgha::ctl::list(&api, json).await {
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
    }
}
