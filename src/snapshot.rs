//! The snapshot the agent loop publishes after every pass and the API
//! serves: the last observation and decision, never a live query. Written
//! by `agent`, read by `api`; neither reaches into the other.

use std::time::{Duration, Instant};

use crate::dcs::HistoryEntry;
use crate::ha::{
    DynamicConfig, MemberStatus, RouteChoice, SwitchoverKey, SyncKey, SyncMode, SyncSet,
};

/// What the API serves: the last observation and decision, never a live query.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub taken_at: Instant,
    pub scope: String,
    pub me: MemberStatus,
    pub leader: Option<String>,
    /// Term of the current leader: the revision its key was written at.
    pub leader_revision: Option<i64>,
    pub members: Vec<MemberStatus>,
    pub history: Vec<HistoryEntry>,
    pub config: Option<DynamicConfig>,
    pub dcs_reachable: bool,
    /// When etcd last answered a read.
    pub dcs_last_seen: Option<Instant>,
    /// Time left before this node's leader lease may expire, if it leads.
    pub lease_remaining: Option<Duration>,
    /// Time left before this node must stop taking writes, if it leads.
    pub fencing_remaining: Option<Duration>,
    /// Postgres reports settings changed that need a restart.
    pub pending_restart: bool,
    /// Maintenance mode (automatic failover and restarts off).
    pub paused: bool,
    /// The `sync` key: the standbys the leader's acknowledged commits are on.
    pub sync: Option<SyncKey>,
    /// Primary: the standbys Postgres waits for now.
    pub sync_standbys: Option<SyncSet>,
    /// A pending (possibly scheduled) switchover.
    pub switchover: Option<SwitchoverKey>,
    /// Promotions this agent performed since it started.
    pub promotions: u64,
    /// Durations of the agent loop's passes.
    pub loop_durations: LoopHistogram,
    pub last_error: Option<String>,
    /// Where this node's router sends new connections (by member name), when
    /// the router is on.
    pub route: Option<RouteChoice>,
    /// A role change this node has begun: republished the moment it
    /// starts, ahead of the pass's own snapshot.
    pub transition: Option<Transition>,
}

/// A role change under way on this node. The health checks of the role
/// being left fail from its start, so load balancers send new clients
/// elsewhere before Postgres changes under them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// About to promote: Postgres may take writes any moment, so no longer
    /// a replica; a primary once the promotion is confirmed.
    Promoting,
    /// Giving up the primary role (a SIGINT/SIGTERM handover, releasing
    /// the leader key): Postgres may take writes a little longer while it
    /// finishes cleanly, but no longer for new clients.
    SteppingDown,
    /// About to stop Postgres (demotion, handover, fencing, shutdown): no
    /// role check passes.
    Stopping,
}

impl Snapshot {
    /// This member is in the leader's published synchronous set.
    pub fn is_sync_standby(&self, name: &str) -> bool {
        self.leader.as_deref() != Some(name)
            && self
                .sync
                .as_ref()
                .is_some_and(|k| k.set.quorum > 0 && k.set.contains(name))
    }

    /// Leader in synchronous_mode `on` whose Postgres waits for no standby.
    pub fn sync_fallback(&self) -> bool {
        let mode = self.config.as_ref().map(|c| c.synchronous_mode);
        mode == Some(SyncMode::On)
            && self.leader.as_deref() == Some(self.me.name.as_str())
            && self.sync_standbys.as_ref().is_some_and(|s| s.quorum == 0)
    }
}

/// Cumulative histogram of loop pass durations, Prometheus style.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoopHistogram {
    /// Counts of passes that took at most `LOOP_BUCKETS[i]` seconds.
    pub buckets: [u64; LOOP_BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

/// Upper bounds (seconds) of the loop histogram's buckets.
pub const LOOP_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

impl LoopHistogram {
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in LOOP_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += secs;
    }
}
