//! The router's counters and gauges, per listener, and their Prometheus text
//! (same exposition as `/metrics`: `# HELP`, `# TYPE`, then one sample per
//! listener). Updated once per connection event, never per byte.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    /// Read-write: to the primary.
    ReadWrite,
    /// Read-only: to the replicas (or the primary, with `replica_fallback`).
    ReadOnly,
}

impl Listener {
    /// The value of the `listener` label.
    pub fn label(self) -> &'static str {
        match self {
            Listener::ReadWrite => "rw",
            Listener::ReadOnly => "ro",
        }
    }
}

/// The counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerMetrics {
    connections: AtomicU64,
    accepted_total: AtomicU64,
    closed_by_fence_total: AtomicU64,
    route_changes_total: AtomicU64,
    held_connections: AtomicU64,
    bytes_total: AtomicU64,
}

/// The values of one listener's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ListenerStats {
    /// Relayed connections open now.
    pub connections: u64,
    pub accepted_total: u64,
    /// Relayed connections closed because their backend was fenced.
    pub closed_by_fence_total: u64,
    /// Changes of the backend set this listener routes to.
    pub route_changes_total: u64,
    /// Connections waiting for a routable backend now.
    pub held_connections: u64,
    /// Bytes relayed in both directions by connections that have closed.
    pub bytes_total: u64,
}

impl ListenerMetrics {
    pub fn stats(&self) -> ListenerStats {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        ListenerStats {
            connections: get(&self.connections),
            accepted_total: get(&self.accepted_total),
            closed_by_fence_total: get(&self.closed_by_fence_total),
            route_changes_total: get(&self.route_changes_total),
            held_connections: get(&self.held_connections),
            bytes_total: get(&self.bytes_total),
        }
    }

    pub(super) fn accepted(&self) {
        self.accepted_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn fenced(&self) {
        self.closed_by_fence_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn route_changed(&self) {
        self.route_changes_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn relayed(&self, bytes: u64) {
        self.bytes_total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one open relay until the guard is dropped.
    pub(super) fn open(&self) -> GaugeGuard<'_> {
        GaugeGuard::up(&self.connections)
    }

    /// Counts one held connection until the guard is dropped.
    pub(super) fn held(&self) -> GaugeGuard<'_> {
        GaugeGuard::up(&self.held_connections)
    }
}

/// One unit of a gauge, given back on drop (whatever way the task ends).
pub(super) struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    fn up(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every counter of the router.
#[derive(Debug, Default)]
pub struct RouterMetrics {
    pub rw: ListenerMetrics,
    pub ro: ListenerMetrics,
}

/// One metric family: name, type, help, and how to read its value.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ListenerStats) -> u64,
);

const FAMILIES: &[Family] = &[
    (
        "pgha_router_connections",
        "gauge",
        "Connections the router relays now.",
        |s| s.connections,
    ),
    (
        "pgha_router_accepted_total",
        "counter",
        "Connections the router accepted.",
        |s| s.accepted_total,
    ),
    (
        "pgha_router_closed_by_fence_total",
        "counter",
        "Relayed connections closed because their backend stopped being routable (primary changed, route withdrawn or expired, replica left the set).",
        |s| s.closed_by_fence_total,
    ),
    (
        "pgha_router_route_changes_total",
        "counter",
        "Changes of the backends the listener routes to.",
        |s| s.route_changes_total,
    ),
    (
        "pgha_router_held_connections",
        "gauge",
        "New connections waiting for a routable backend.",
        |s| s.held_connections,
    ),
    (
        "pgha_router_bytes_total",
        "counter",
        "Bytes relayed in both directions, counted when a connection closes.",
        |s| s.bytes_total,
    ),
];

impl RouterMetrics {
    pub fn listener(&self, listener: Listener) -> &ListenerMetrics {
        match listener {
            Listener::ReadWrite => &self.rw,
            Listener::ReadOnly => &self.ro,
        }
    }

    /// Prometheus text of every family. `base_labels` go first in every
    /// sample (`scope="demo",name="n1"` as on `/metrics`, already escaped),
    /// or `""` for none.
    pub fn render(&self, base_labels: &str) -> String {
        let mut out = String::with_capacity(1536);
        self.render_into(&mut out, base_labels);
        out
    }

    /// [`RouterMetrics::render`], appended to `out`.
    pub fn render_into(&self, out: &mut String, base_labels: &str) {
        let stats = [
            (Listener::ReadWrite, self.rw.stats()),
            (Listener::ReadOnly, self.ro.stats()),
        ];
        let sep = if base_labels.is_empty() { "" } else { "," };
        for (name, kind, help, value) in FAMILIES {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (listener, s) in &stats {
                let _ = writeln!(
                    out,
                    "{name}{{{base_labels}{sep}listener=\"{}\"}} {}",
                    listener.label(),
                    value(s)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_for_both_listeners() {
        let m = RouterMetrics::default();
        m.rw.accepted();
        m.rw.accepted();
        m.ro.fenced();
        m.rw.relayed(10);
        m.rw.relayed(5);
        let open = m.rw.open();
        let held = m.ro.held();
        let text = m.render("");
        for line in [
            "# TYPE pgha_router_connections gauge",
            "# TYPE pgha_router_accepted_total counter",
            "pgha_router_connections{listener=\"rw\"} 1",
            "pgha_router_connections{listener=\"ro\"} 0",
            "pgha_router_accepted_total{listener=\"rw\"} 2",
            "pgha_router_closed_by_fence_total{listener=\"ro\"} 1",
            "pgha_router_route_changes_total{listener=\"rw\"} 0",
            "pgha_router_held_connections{listener=\"ro\"} 1",
            "pgha_router_bytes_total{listener=\"rw\"} 15",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("# HELP")).count(), 6);
        drop((open, held));
        assert_eq!(m.rw.stats().connections, 0);
        assert_eq!(m.ro.stats().held_connections, 0);
        let with_base = m.render("scope=\"demo\",name=\"n1\"");
        assert!(
            with_base.contains(
                "pgha_router_accepted_total{scope=\"demo\",name=\"n1\",listener=\"rw\"} 2\n"
            ),
            "{with_base}"
        );
    }
}
