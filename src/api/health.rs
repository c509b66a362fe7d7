//! The role checks of a snapshot (fresh, leader, primary, replica,
//! running): what the health endpoints answer and the metrics report, in
//! one place both read.

use std::time::Duration;

use super::status::running;
use crate::ha::MemberRole;
use crate::snapshot::Snapshot;

/// The role checks of one snapshot at one age, shared by the health
/// endpoints and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// The agent loop published this snapshot within the stale threshold.
    pub fresh: bool,
    /// Holds the leader key with a lease that has not run out.
    pub leader: bool,
    /// Leader, Postgres runs as primary, and the fencing deadline (after
    /// which it must not take writes) has not passed.
    pub primary: bool,
    /// Postgres runs as a replica.
    pub replica: bool,
    /// Postgres runs, whatever its role.
    pub running: bool,
}

impl Health {
    pub fn of(s: &Snapshot, age: Duration, stale_after: Duration) -> Health {
        let fresh = age <= stale_after;
        let me = &s.me;
        // Remaining times were measured when the snapshot was taken.
        let leader = fresh
            && s.leader.as_deref() == Some(me.name.as_str())
            && s.lease_remaining.is_some_and(|r| r > age);
        let running = fresh && running(me);
        Health {
            fresh,
            leader,
            primary: leader
                && running
                && me.role == MemberRole::Primary
                && s.fencing_remaining.is_some_and(|r| r > age),
            replica: running && me.role == MemberRole::Replica,
            running,
        }
    }
}
