//! The configuration the decision core reads, as plain numbers, and the
//! fencing-deadline arithmetic built on it. Shared by `decide` and the
//! planned-handover rules, so neither reaches into the other.

use super::state::{Observation, Tick};

/// The parts of the configuration the core needs, as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Leader lease TTL in milliseconds.
    pub ttl_ms: u64,
    /// The primary stops taking writes this long before its lease can expire.
    pub fencing_margin_ms: u64,
    /// A standby that cannot stream from a leader on a newer timeline for
    /// this long is stopped and rewound.
    pub rewind_after_ms: u64,
    /// A stopped leader waits this long for its handover target to confirm
    /// all WAL before it starts again as primary.
    pub handover_timeout_ms: u64,
    /// A load balancer polling `/primary` takes a node out this long after
    /// its check turned 503 (HAProxy: `inter × fall`). A primary that stopped
    /// being one keeps Postgres down this long before it runs as a standby,
    /// so such a balancer never sends a read-write client to it read-only.
    pub balancer_window_ms: u64,
}

impl Settings {
    /// From a renewal's send time to its fencing deadline: ttl − margin.
    pub fn fence_window_ms(&self) -> u64 {
        self.ttl_ms.saturating_sub(self.fencing_margin_ms)
    }

    /// Instant from which a primary renewed at `renewed_at` must no longer take writes.
    pub fn fencing_deadline(&self, renewed_at: Tick) -> Tick {
        renewed_at.plus_ms(self.fence_window_ms())
    }
}

/// We hold a lease whose fencing deadline is still ahead. A view can
/// predate the lease's expiry (a late answer, an agent restarted on a key
/// about to expire), and a primary started or promoted without a held lease
/// runs with no fencing deadline: the key alone proves nothing.
pub(super) fn lease_proven(obs: &Observation, settings: &Settings, now: Tick) -> bool {
    obs.leader_lease
        .is_some_and(|l| now < settings.fencing_deadline(l.renewed_at))
}
