//! Node commands: `run` (the agent, its API and TLS, wired together in
//! [`run_node`]), `check-config` and `health`.

use std::path::Path;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::load_config;
use crate::config::{Config, LogFormat};

/// `pgha run`: the agent, under a reaper when it is a container's PID 1.
pub(super) async fn run(config: &Path) -> ExitCode {
    match load_config(config) {
        // As a container's PID 1 the agent runs as a child of a reaper.
        Ok(cfg) if crate::reaper::is_pid1() => {
            init_tracing(cfg.log.format, &cfg.log.level);
            crate::reaper::supervise(std::env::args_os().skip(1).collect()).await
        }
        Ok(cfg) => run_node(cfg).await,
        Err(code) => code,
    }
}

/// `pgha check-config FILE`: exit 0 with a one-line summary, or 2.
pub(super) fn check_config(file: &Path) -> ExitCode {
    match load_config(file) {
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
    }
}

/// `pgha health`: exit 0 when the endpoint answers 200.
pub(super) async fn health(api: &str, path: &str) -> ExitCode {
    match crate::ctl::get_json(api, path).await {
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
    }
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

/// Wires one node: signals, TLS, the agent and its API, until shutdown.
async fn run_node(cfg: Config) -> ExitCode {
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
    let tls = match crate::tls::NodeTls::prepare(
        &cfg.tls,
        &cfg.postgresql.os_user,
        &cfg.postgresql.data_dir,
    ) {
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
            if let Err(e) = crate::tls::https::trust_for_api_clients(tls.ca_pem(), None) {
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
    let (agent, snapshots) = match crate::agent::Agent::new(cfg.clone()).await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(node = %cfg.name, error = %e, "cannot start");
            return ExitCode::from(1);
        }
    };
    // The router: one address for the application, fenced with the route.
    let router_stop = CancellationToken::new();
    let router = if cfg.router.enabled {
        match crate::router::Router::start(&cfg.router, agent.routes(), router_stop.clone()) {
            Ok(r) => {
                tracing::info!(node = %cfg.name, rw = %r.rw_addr, ro = ?r.ro_addr, "router listening");
                Some(r)
            }
            Err(e) => {
                tracing::error!(node = %cfg.name, error = %e, "cannot start the router");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let stale_after = cfg.timing.ttl;
    let api_shutdown = CancellationToken::new();
    let operator = crate::api::Operator {
        calls: agent.operator_handle(),
        auth: crate::api::operator::Auth::from_config(&cfg.api),
        failsafe: agent.failsafe_promise(),
        failsafe_ttl: cfg.timing.ttl,
    };
    let api = tokio::spawn(crate::api::serve_with_tls(
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
    router_stop.cancel();
    if let Some(r) = &router {
        r.stopped().await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(node = %cfg.name, error = %e, "agent stopped");
            ExitCode::from(1)
        }
    }
}
