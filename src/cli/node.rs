//! Node commands: `run` (the agent, its API and TLS, wired together in
//! [`run_node`]), `check-config` and `health`.

use std::path::Path;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

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

/// `pgha check-config FILE`: exit 0 with a one-line summary (and a line
/// for each key the platform filled in), or 2.
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
            for default in &cfg.identity_defaults {
                println!(
                    "  {} = {:?} (from {})",
                    default.key, default.value, default.origin
                );
            }
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
    log_subscriber(format, filter, std::io::stderr).init();
}

/// The log output. The node's name is a field of the `agent` span, not of
/// each event: text shows it as `agent{node=n1}:`, JSON as
/// `"span":{"node":"n1","name":"agent"}` next to the flattened event fields.
fn log_subscriber<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
) -> tracing::Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .into(),
        LogFormat::Text => builder.with_ansi(false).into(),
    }
}

/// The span every line of one node's agent is logged in, in its own task
/// and in the tasks it spawns (they are spawned `in_current_span`).
fn agent_span(node: &str) -> tracing::Span {
    tracing::info_span!("agent", node = %node)
}

/// Wires one node: signals, TLS, the agent and its API, until shutdown.
async fn run_node(cfg: Config) -> ExitCode {
    init_tracing(cfg.log.format, &cfg.log.level);
    let span = agent_span(&cfg.name);
    span.in_scope(|| {
        for default in &cfg.identity_defaults {
            tracing::info!(
                key = default.key,
                value = %default.value,
                from = %default.origin,
                "config key not in the file: filled in"
            );
        }
    });
    wire_node(cfg).instrument(span).await
}

async fn wire_node(cfg: Config) -> ExitCode {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    let watch_signals = async move {
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
    };
    tokio::spawn(watch_signals.in_current_span());
    // Certificates before Postgres starts; a CA that went bad since the
    // config was read stops the start here, never a plaintext fallback.
    let tls = match crate::tls::NodeTls::prepare(
        &cfg.tls,
        &cfg.postgresql.os_user,
        &cfg.postgresql.data_dir,
    ) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up TLS");
            return ExitCode::from(2);
        }
    };
    let mut api_tls = None;
    if let Some(tls) = &tls {
        if tls.config().shared_ca() {
            // Members ask each other's API (https:// with tls.api).
            if let Err(e) = crate::tls::https::trust_for_api_clients(tls.ca_pem(), None) {
                tracing::error!(error = %e, "cannot set up TLS");
                return ExitCode::from(2);
            }
        }
        api_tls = match tls.api_server() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the HTTPS API");
                return ExitCode::from(2);
            }
        };
        tokio::spawn(tls.clone().rotate(shutdown.clone()).in_current_span());
    }
    // The router's listeners are bound first, so the member key can
    // publish their real ports (also when the configured ones are 0).
    let mut cfg = cfg;
    let bound_router = if cfg.router.enabled {
        match crate::router::Router::bind(&cfg.router) {
            Ok(bound) => {
                cfg.router.listen = bound.rw_addr;
                cfg.router.replica_listen = bound.ro_addr;
                Some(bound)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the router");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let (agent, snapshots) = match crate::agent::Agent::new(cfg.clone()).await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(1);
        }
    };
    // The router: one address for the application, fenced with the route.
    let router_stop = CancellationToken::new();
    let router = bound_router.map(|bound| bound.start(agent.routes(), router_stop.clone()));
    // Backups: a task of its own that reads the snapshots.
    let backup_stop = CancellationToken::new();
    let mut backup = None;
    if let Some(pgbackrest) = agent.pgbackrest() {
        match crate::dcs::Etcd::connect(&cfg.etcd, cfg.timing.retry_timeout).await {
            Ok(etcd) => {
                let (handle, _task) = crate::backup::task::start(
                    pgbackrest,
                    etcd,
                    snapshots.clone(),
                    cfg.timing.ttl,
                    backup_stop.clone(),
                );
                backup = Some(handle);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the backup task");
                return ExitCode::from(1);
            }
        }
    }
    let stale_after = cfg.timing.ttl;
    let api_shutdown = CancellationToken::new();
    let operator = crate::api::Operator {
        calls: agent.operator_handle(),
        auth: crate::api::operator::Auth::from_config(&cfg.api),
        failsafe: agent.failsafe_promise(),
        failsafe_ttl: cfg.timing.ttl,
    };
    let api = tokio::spawn(
        crate::api::serve_with_tls(
            cfg.api.listen.clone(),
            cfg.ip_family,
            snapshots,
            stale_after,
            Some(operator),
            crate::api::ApiSetup {
                https: api_tls,
                certificates: tls.as_ref().map(|t| t.expiries()),
                router: router.as_ref().map(|r| std::sync::Arc::clone(&r.metrics)),
                backup,
            },
            api_shutdown.clone(),
        )
        .in_current_span(),
    );
    let result = tokio::select! {
        r = agent.run(shutdown.clone()) => r,
        r = api => {
            tracing::error!(result = ?r, "api server stopped");
            shutdown.cancel();
            return ExitCode::from(1);
        }
    };
    api_shutdown.cancel();
    router_stop.cancel();
    backup_stop.cancel();
    if let Some(r) = &router {
        r.stopped().await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent stopped");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What one event logged in the agent span and one in a task spawned
    /// from it look like in `format`.
    fn lines(format: LogFormat) -> Vec<String> {
        let out = Captured::default();
        let writer = out.clone();
        let filter = tracing_subscriber::EnvFilter::new("info");
        let dispatch = log_subscriber(format, filter, move || writer.clone());
        tracing::dispatcher::with_default(&dispatch, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(
                async {
                    tracing::info!(term = 3, "in the agent");
                    let spawned = async { tracing::warn!("in a spawned task") };
                    tokio::spawn(spawned.in_current_span()).await.unwrap();
                }
                .instrument(agent_span("n1")),
            );
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn text_lines_name_the_node() {
        let lines = lines(LogFormat::Text);
        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in &lines {
            assert!(line.contains("agent{node=n1}"), "{line}");
        }
        assert!(lines[0].contains("term=3"), "{}", lines[0]);
    }

    #[test]
    fn json_lines_name_the_node() {
        let lines = lines(LogFormat::Json);
        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["span"]["node"], "n1", "{line}");
            assert_eq!(v["span"]["name"], "agent", "{line}");
        }
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["term"], 3, "{}", lines[0]);
    }
}
