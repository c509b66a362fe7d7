//! The one task that reads the agent's route: it turns it into the backends
//! the listeners may use now, each with a fence token that every connection
//! relayed to it obeys. When a backend stops being routable (another primary,
//! route withdrawn, `valid_until` passed: its own timer, not the agent's
//! loop) its token is cancelled and all its connections close at once. A
//! renewal of `valid_until` for the same backends keeps the tokens.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::metrics::RouterMetrics;
use super::route::{Backend, Route};

/// A backend while it is routable; replaced by a new one when it becomes
/// routable again after a fence.
#[derive(Debug)]
pub(super) struct Assignment {
    pub(super) backend: Backend,
    /// Cancelled when the backend stops being routable (or the router stops).
    pub(super) fence: CancellationToken,
    /// Connections relayed to it now, for the fence's log line.
    pub(super) open: AtomicUsize,
}

impl Assignment {
    fn new(backend: Backend, shutdown: &CancellationToken) -> Arc<Assignment> {
        Arc::new(Assignment {
            backend,
            fence: shutdown.child_token(),
            open: AtomicUsize::new(0),
        })
    }

    fn fence(&self, role: &str, reason: &str) {
        let connections = self.open.load(Ordering::Relaxed);
        if connections > 0 {
            warn!(
                backend = %self.backend,
                role,
                connections,
                reason,
                "router: fencing: closing connections"
            );
        }
        self.fence.cancel();
    }
}

/// What the listeners route to now.
#[derive(Debug, Clone, Default)]
pub(super) struct Routing {
    pub(super) primary: Option<Arc<Assignment>>,
    pub(super) replicas: Vec<Arc<Assignment>>,
    pub(super) valid_until: Option<Instant>,
}

impl Routing {
    /// Whether the backends may still be used at `now` (the fencer's timer
    /// may be a moment late; a new connection does not wait for it).
    pub(super) fn is_valid_at(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| until > now)
    }
}

/// Applies `route` at `now` to `current`: fences what is no longer
/// routable, adds what became routable, counts and logs the changes.
fn apply(
    current: &mut Routing,
    route: &Route,
    now: Instant,
    metrics: &RouterMetrics,
    shutdown: &CancellationToken,
) {
    let old = current.primary.as_ref().map(|a| a.backend.clone());
    let want = route.primary_at(now);
    if old.as_ref() != want {
        let reason = route.change_reason(old.as_ref(), now);
        if let Some(previous) = current.primary.take() {
            previous.fence("primary", reason);
        }
        current.primary = want.map(|b| Assignment::new(b.clone(), shutdown));
        metrics.rw.route_changed();
        info!(
            old = old.as_ref().map_or("none", |b| b.name.as_str()),
            new = want.map_or("none", |b| b.name.as_str()),
            address = want.map(Backend::address).unwrap_or_default(),
            reason,
            "router: primary route changed"
        );
    }

    let want = route.replicas_at(now);
    let mut replicas = Vec::with_capacity(want.len());
    for backend in want {
        if replicas
            .iter()
            .any(|a: &Arc<Assignment>| &a.backend == backend)
        {
            continue;
        }
        let kept = current.replicas.iter().find(|a| &a.backend == backend);
        replicas.push(kept.map_or_else(|| Assignment::new(backend.clone(), shutdown), Arc::clone));
    }
    let left: Vec<_> = current
        .replicas
        .iter()
        .filter(|a| !replicas.iter().any(|b| Arc::ptr_eq(a, b)))
        .collect();
    let joined = replicas
        .iter()
        .filter(|a| !current.replicas.iter().any(|b| Arc::ptr_eq(a, b)))
        .count();
    if !left.is_empty() || joined > 0 {
        let reason = if route.is_valid_at(now) {
            "replica set changed"
        } else if route.valid_until.is_some() {
            "route expired: valid_until passed without renewal"
        } else {
            "no route"
        };
        for replica in &left {
            replica.fence("replica", reason);
        }
        metrics.ro.route_changed();
        let names = |list: &[Arc<Assignment>]| {
            list.iter()
                .map(|a| a.backend.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        info!(
            old = names(&current.replicas),
            new = names(&replicas),
            reason,
            "router: replica route changed"
        );
    }
    current.replicas = replicas;
    current.valid_until = route.valid_until;
}

/// Runs until `shutdown`: follows `routes`, publishes what is routable on
/// `publish`, and fences backends at once when they stop being routable.
pub(super) async fn run(
    mut routes: watch::Receiver<Route>,
    publish: watch::Sender<Arc<Routing>>,
    metrics: Arc<RouterMetrics>,
    shutdown: CancellationToken,
) {
    let mut current = Routing::default();
    let mut publisher_gone = false;
    loop {
        let route = routes.borrow_and_update().clone();
        apply(&mut current, &route, Instant::now(), &metrics, &shutdown);
        publish.send_replace(Arc::new(current.clone()));
        // Wake at valid_until only while something is routable under it.
        let deadline = current
            .valid_until
            .filter(|_| current.primary.is_some() || !current.replicas.is_empty())
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = routes.changed(), if !publisher_gone => {
                if changed.is_err() {
                    // The agent is gone: what it published holds until valid_until.
                    publisher_gone = true;
                    warn!("router: the route publisher is gone; the last route ends at its valid_until");
                }
            }
            () = sleep_until_opt(deadline) => {}
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn route(primary: Option<&str>, replicas: &[&str], valid_until: Option<Instant>) -> Route {
        let backend = |name: &str| Backend::new(name, "127.0.0.1", 5433);
        Route {
            primary: primary.map(backend),
            replicas: replicas.iter().map(|n| backend(n)).collect(),
            valid_until,
        }
    }

    #[test]
    fn renewals_keep_tokens_changes_fence_them() {
        let metrics = RouterMetrics::default();
        let shutdown = CancellationToken::new();
        let now = Instant::now();
        let soon = Some(now + Duration::from_secs(5));
        let mut routing = Routing::default();
        apply(
            &mut routing,
            &route(Some("n1"), &["n2", "n3"], soon),
            now,
            &metrics,
            &shutdown,
        );
        let n1 = routing.primary.clone().unwrap();
        let n2 = routing.replicas[0].clone();
        let n3 = routing.replicas[1].clone();
        assert_eq!(
            (
                metrics.rw.stats().route_changes_total,
                metrics.ro.stats().route_changes_total
            ),
            (1, 1)
        );

        // Renewal: same backends, later valid_until: nothing fenced or counted.
        let later = Some(now + Duration::from_secs(10));
        apply(
            &mut routing,
            &route(Some("n1"), &["n2", "n3"], later),
            now,
            &metrics,
            &shutdown,
        );
        assert!(Arc::ptr_eq(routing.primary.as_ref().unwrap(), &n1));
        assert!(!n1.fence.is_cancelled() && !n2.fence.is_cancelled());
        assert_eq!(routing.valid_until, later);
        assert_eq!(metrics.rw.stats().route_changes_total, 1);

        // n3 leaves the replicas: only n3 is fenced.
        apply(
            &mut routing,
            &route(Some("n1"), &["n2"], later),
            now,
            &metrics,
            &shutdown,
        );
        assert!(n3.fence.is_cancelled() && !n2.fence.is_cancelled());
        assert_eq!(metrics.ro.stats().route_changes_total, 2);

        // Primary change fences n1.
        apply(
            &mut routing,
            &route(Some("n2"), &[], later),
            now,
            &metrics,
            &shutdown,
        );
        assert!(n1.fence.is_cancelled() && n2.fence.is_cancelled());
        let n2_primary = routing.primary.clone().unwrap();
        assert_eq!(n2_primary.backend.name, "n2");

        // Expiry without any update fences everything.
        let expired = now + Duration::from_secs(10);
        apply(
            &mut routing,
            &route(Some("n2"), &[], later),
            expired,
            &metrics,
            &shutdown,
        );
        assert!(n2_primary.fence.is_cancelled());
        assert!(routing.primary.is_none());
        assert_eq!(metrics.rw.stats().route_changes_total, 3);

        // Shutdown cancels every token (children of it).
        apply(
            &mut routing,
            &route(Some("n1"), &["n3"], Some(expired + Duration::from_secs(1))),
            expired,
            &metrics,
            &shutdown,
        );
        shutdown.cancel();
        assert!(routing.primary.as_ref().unwrap().fence.is_cancelled());
        assert!(routing.replicas[0].fence.is_cancelled());
    }
}
