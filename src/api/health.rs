//! The role checks of a snapshot (fresh, leader, primary, replica,
//! running): what the health endpoints answer and the metrics report, in
//! one place both read.

use std::time::Duration;

use super::status::running;
use crate::ha::MemberRole;
use crate::snapshot::{Snapshot, Transition};

/// The role checks of one snapshot at one age, shared by the health
/// endpoints and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// The agent loop published this snapshot within the stale threshold.
    pub fresh: bool,
    /// Holds the leader key with a lease that has not run out, and is not
    /// giving the primary role up.
    pub leader: bool,
    /// Leader, Postgres runs as primary, and the fencing deadline (after
    /// which it must not take writes) has not passed.
    pub primary: bool,
    /// Postgres runs as a replica and is not being promoted or stopped.
    pub replica: bool,
    /// Postgres runs, whatever its role.
    pub running: bool,
}

impl Health {
    pub fn of(s: &Snapshot, age: Duration, stale_after: Duration) -> Health {
        let fresh = age <= stale_after;
        let me = &s.me;
        // A role change under way: the role being left fails at once.
        let leaving_primary = matches!(
            s.transition,
            Some(Transition::SteppingDown | Transition::Stopping)
        );
        let leaving_replica = matches!(
            s.transition,
            Some(Transition::Promoting | Transition::Stopping)
        );
        // Remaining times were measured when the snapshot was taken.
        let leader = fresh
            && !leaving_primary
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
            replica: running && !leaving_replica && me.role == MemberRole::Replica,
            running,
        }
    }
}
