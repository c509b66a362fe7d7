//! The router: a TCP relay in the agent that sends every new connection on
//! its read-write listener to the current primary (and, optionally, spreads
//! a read-only listener over the replicas), fenced with the lease.
//!
//! The agent publishes a [`Route`] on a `watch` channel; the router only
//! reads it and never waits on the agent loop. One task (`fencing`) follows
//! the route and the clock and closes connections to a backend at once when
//! it stops being routable; each connection is its own task (`relay`).

mod fencing;
mod metrics;
mod relay;
mod route;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

pub use crate::config::RouterConfig;
pub use metrics::{Listener, ListenerMetrics, ListenerStats, RouterMetrics};
pub use route::{Backend, Route};

use fencing::Routing;

/// What every connection task of one router shares.
struct Shared {
    config: RouterConfig,
    /// What is routable now, published by the fencing task.
    routing: watch::Receiver<Arc<Routing>>,
    metrics: Arc<RouterMetrics>,
    /// Round-robin position of the read-only listener.
    next_replica: AtomicUsize,
    shutdown: CancellationToken,
}

/// A running router.
#[derive(Debug)]
pub struct RouterHandle {
    /// Where the read-write listener is bound (the real port when the
    /// configured one was 0).
    pub rw_addr: SocketAddr,
    /// Where the read-only listener is bound, if configured.
    pub ro_addr: Option<SocketAddr>,
    pub metrics: Arc<RouterMetrics>,
    tasks: TaskTracker,
}

impl RouterHandle {
    /// Resolves once the router's cancellation token is cancelled and every
    /// task of it (listeners, fencing, connections) has ended.
    pub async fn stopped(&self) {
        self.tasks.wait().await;
    }
}

/// The router's entry point.
pub struct Router;

/// A router whose listeners are bound (so their real ports are known, also
/// when the configured ones were 0) and not serving yet.
#[derive(Debug)]
pub struct BoundRouter {
    config: RouterConfig,
    rw: TcpListener,
    ro: Option<TcpListener>,
    /// Where the read-write listener is bound.
    pub rw_addr: SocketAddr,
    /// Where the read-only listener is bound, if configured.
    pub ro_addr: Option<SocketAddr>,
}

impl Router {
    /// Binds the listeners and starts the router under `cancel` (see
    /// [`BoundRouter::start`]). Must run inside a tokio runtime.
    pub fn start(
        config: &RouterConfig,
        routes: watch::Receiver<Route>,
        cancel: CancellationToken,
    ) -> std::io::Result<RouterHandle> {
        Ok(Router::bind(config)?.start(routes, cancel))
    }

    /// Binds the listeners; a failure names the config key. Must run inside
    /// a tokio runtime.
    pub fn bind(config: &RouterConfig) -> std::io::Result<BoundRouter> {
        let rw = bind(config.listen, config.dual_stack, "router.listen")?;
        let ro = config
            .replica_listen
            .map(|addr| bind(addr, config.dual_stack, "router.replica_listen"))
            .transpose()?;
        let rw_addr = rw.local_addr()?;
        let ro_addr = ro.as_ref().map(TcpListener::local_addr).transpose()?;
        Ok(BoundRouter {
            config: config.clone(),
            rw,
            ro,
            rw_addr,
            ro_addr,
        })
    }
}

impl BoundRouter {
    /// Starts serving under `cancel`; when it is cancelled the listeners
    /// close and every relayed connection with them.
    pub fn start(self, routes: watch::Receiver<Route>, cancel: CancellationToken) -> RouterHandle {
        let BoundRouter {
            config,
            rw,
            ro,
            rw_addr,
            ro_addr,
        } = self;
        let metrics = Arc::new(RouterMetrics::default());
        let (publish, routing) = watch::channel(Arc::new(Routing::default()));
        let tasks = TaskTracker::new();
        // The caller's span (the agent's, with the node name) on every task.
        tasks.spawn(
            fencing::run(routes, publish, Arc::clone(&metrics), cancel.clone()).in_current_span(),
        );
        let shared = Arc::new(Shared {
            config,
            routing,
            metrics: Arc::clone(&metrics),
            next_replica: AtomicUsize::new(0),
            shutdown: cancel,
        });
        tasks.spawn(
            accept(rw, Listener::ReadWrite, Arc::clone(&shared), tasks.clone()).in_current_span(),
        );
        if let Some(ro) = ro {
            tasks.spawn(accept(ro, Listener::ReadOnly, shared, tasks.clone()).in_current_span());
        }
        tasks.close();
        info!(rw = %rw_addr, ro = ?ro_addr, "router: listening");
        RouterHandle {
            rw_addr,
            ro_addr,
            metrics,
            tasks,
        }
    }
}

/// Binds one listener; a failure names the config key.
fn bind(addr: SocketAddr, dual_stack: bool, key: &str) -> std::io::Result<TcpListener> {
    crate::net::bind_listener(addr, dual_stack)
        .and_then(TcpListener::from_std)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{key} {addr}: {e}")))
}

/// Pause after a failed accept (out of file descriptors): no busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

async fn accept(listener: TcpListener, kind: Listener, shared: Arc<Shared>, tasks: TaskTracker) {
    let metrics = shared.metrics.listener(kind);
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                metrics.accepted();
                if let Err(err) = relay::tune(&client, shared.config.keepalive) {
                    warn!(%peer, error = %err, "router: cannot set TCP options on a client");
                }
                tasks
                    .spawn(relay::serve(client, peer, kind, Arc::clone(&shared)).in_current_span());
            }
            Err(err) => {
                warn!(listener = kind.label(), error = %err, "router: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}
