//! Where this node's router sends new connections: a pure function of the
//! observation, like `decide`. The agent turns member names into addresses
//! and publishes the result to `crate::router`; the router closes what it
//! relayed to a backend that leaves the route, and everything once the
//! route's validity runs out without a newer one (fencing at the router).

use super::memory::Memory;
use super::state::*;

/// The route by member name, and until when it may be used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteChoice {
    /// The member whose Postgres takes writes now: it holds the leader key
    /// and runs as primary.
    pub primary: Option<String>,
    /// Running, streaming replicas within `maximum_lag_on_failover` of the
    /// leader and not tagged `noloadbalance`, by name.
    pub replicas: Vec<String>,
    /// The route may be used until then (this node's clock); `None`: no
    /// etcd view confirmed it.
    pub valid_until: Option<Tick>,
}

/// The route this node's router uses after observing `obs`, with what
/// `memory` holds of the last etcd view.
///
/// A view shows a leader key at most one lease after the read behind it was
/// sent (`memory.last_view_at`, no later than that send), and the leader
/// stops taking writes a fence window after its last renewal, so the route
/// is valid for `fence_window_ms` from then (for the leader itself: until
/// its own fencing deadline, which failsafe confirmations move too). A
/// failed read changes nothing: the route of the last view stands until it
/// runs out, so an etcd hiccup costs no connection, while a node cut off
/// from etcd for good closes its clients' connections no later than the old
/// primary fences itself.
pub fn route(obs: &Observation, memory: &Memory, fence_window_ms: u64) -> RouteChoice {
    let Some(dcs) = obs.dcs.as_ref().or(memory.last_view.as_ref()) else {
        return RouteChoice::default();
    };
    let Some(key) = &dcs.leader else {
        return RouteChoice::default();
    };
    let read_sent = memory.last_view_at;
    let i_lead = key.name == obs.node;
    let valid_until = if i_lead {
        // Our own lease: what the fence guard enforces.
        obs.leader_lease
            .filter(|l| l.lease_id == key.lease_id)
            .map(|l| l.renewed_at.plus_ms(fence_window_ms))
    } else {
        Some(read_sent.plus_ms(fence_window_ms))
    };
    let leader = dcs.member(&key.name);
    let primary_runs = if i_lead {
        // Our own probe is fresher than the member key we publish later; a
        // primary that began to stop (handover, shutdown) takes no new
        // connections, and those open are closed before its checkpoint.
        let stopping = memory.handover.is_some() || obs.job == Some(Job::Stop);
        obs.local.running && obs.local.role == Some(PgRole::Primary) && !stopping
    } else {
        leader.is_some_and(|m| m.role == MemberRole::Primary && m.state == "running")
    };
    let leader_lsn = leader.and_then(|m| m.wal_position).or(dcs.last_leader_lsn);
    let replicas = dcs
        .members
        .iter()
        .filter(|m| m.name != key.name && m.role == MemberRole::Replica)
        .filter(|m| m.state == "streaming" && !m.noloadbalance)
        .filter(|m| {
            let at = m.receive_lsn.max(m.replay_lsn).or(m.wal_position);
            match (leader_lsn, at) {
                (Some(l), Some(at)) => {
                    l.0.saturating_sub(at.0) <= dcs.config.maximum_lag_on_failover
                }
                _ => false,
            }
        })
        .map(|m| m.name.clone())
        .collect();
    RouteChoice {
        primary: primary_runs.then(|| key.name.clone()),
        replicas,
        valid_until,
    }
}
