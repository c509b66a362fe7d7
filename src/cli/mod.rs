//! The `pgha` command line: clap definitions and one handler per command,
//! grouped by what they act on (`node`: this node's agent; `cluster` and
//! `dynamic_config`: a running cluster through its API; `certs`:
//! certificate files). The binary only parses and calls [`Cli::dispatch`].

mod backup;
mod certs;
mod cluster;
mod dynamic_config;
mod node;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use dynamic_config::ConfigAction;
use target::Target;

#[derive(Parser)]
#[command(name = "pgha", version, about = "PostgreSQL high-availability agent")]
pub struct Cli {
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
    /// Begin a base backup on the leader (pgBackRest; `[backup]` on).
    Backup {
        #[command(flatten)]
        target: Target,
        /// full, diff or incr.
        #[arg(long = "type", default_value = "full", value_parser = parse_kind)]
        kind: crate::backup::Kind,
        /// Wait until the backup is in the repository (at most this long,
        /// e.g. 10m), then print it.
        #[arg(long, value_parser = humantime::parse_duration, num_args = 0..=1, default_missing_value = "1h")]
        wait: Option<std::time::Duration>,
    },
    /// List the backups in the repository.
    Backups {
        #[command(flatten)]
        target: Target,
    },
    /// Restore the cluster as of a point in time into a new directory on
    /// this machine (from the repository of this node's config).
    Restore {
        #[arg(long, short, env = "PGHA_CONFIG")]
        config: PathBuf,
        /// A time ("2026-12-08 10:00:00+00"), an LSN ("0/3000060") or "latest".
        #[arg(long)]
        to: String,
        /// The new data directory (must not exist, or be empty).
        #[arg(long)]
        into: PathBuf,
    },
    /// Certificates: create a cluster CA, issue an operator's client
    /// certificate, describe certificates.
    Certs {
        #[command(subcommand)]
        action: certs::CertsAction,
    },
}

impl Cli {
    /// Carries out the parsed command; its exit code.
    pub async fn dispatch(self) -> ExitCode {
        use hyper::Method;
        match self.command {
            Command::Run { config } => node::run(&config).await,
            Command::CheckConfig { file } => node::check_config(&file),
            Command::Health { api, path } => node::health(&api, &path).await,
            // Only reached with other arguments than the agent passes.
            Command::FenceGuard { .. } => {
                eprintln!("error: fence-guard takes exactly --data-dir DIR");
                ExitCode::from(2)
            }
            Command::List { target } => cluster::list(&target).await,
            Command::Switchover {
                target,
                leader,
                to,
                at,
                cancel,
                force,
            } => cluster::switchover(&target, leader, to, at, cancel, force).await,
            Command::Failover { target, to, force } => {
                let body = serde_json::json!({ "candidate": to, "force": force });
                cluster::operator(&target, None, Method::POST, "/failover", Some(body)).await
            }
            Command::Pause { target } => {
                cluster::operator(&target, None, Method::POST, "/pause", None).await
            }
            Command::Resume { target } => {
                cluster::operator(&target, None, Method::POST, "/resume", None).await
            }
            Command::Restart {
                node,
                target,
                pending,
            } => {
                let body = pending.then(|| serde_json::json!({ "restart_pending": true }));
                cluster::operator(&target, Some(&node), Method::POST, "/restart", body).await
            }
            Command::Reload { node, target } => {
                cluster::operator(&target, Some(&node), Method::POST, "/reload", None).await
            }
            Command::Reinit {
                node,
                target,
                force,
            } => cluster::reinit(&target, &node, force).await,
            Command::History { target } => cluster::history(&target).await,
            Command::Config { action } => dynamic_config::run(action).await,
            Command::Backup { target, kind, wait } => backup::backup(&target, kind, wait).await,
            Command::Backups { target } => backup::list(&target).await,
            Command::Restore { config, to, into } => backup::restore(&config, &to, &into).await,
            Command::Certs { action } => match certs::run(action) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            },
        }
    }
}

fn parse_kind(text: &str) -> Result<crate::backup::Kind, String> {
    crate::backup::Kind::parse(text)
        .ok_or_else(|| format!("expected full, diff or incr, got {text:?}"))
}

pub(super) fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
