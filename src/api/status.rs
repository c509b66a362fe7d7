//! The JSON documents the API serves, rendered once per snapshot. Load
//! balancers poll health endpoints every second or faster, so a request
//! copies prepared bytes instead of serialising the snapshot again.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::clock::rfc3339_ms as rfc3339;
use crate::ha::{Lsn, MemberRole, MemberStatus};
use crate::snapshot::Snapshot;

/// A snapshot with its documents serialised.
#[derive(Debug)]
pub struct Rendered {
    pub snapshot: Arc<Snapshot>,
    /// `/status` without its closing brace: each answer appends the
    /// snapshot's age and the lease's remaining times, which change
    /// between snapshots.
    status_open: Bytes,
    pub cluster: Bytes,
    pub history: Bytes,
    /// `None` until the cluster's dynamic config has been read from etcd.
    pub config: Option<Bytes>,
}

impl Rendered {
    pub fn new(snapshot: Arc<Snapshot>) -> Rendered {
        let s = &*snapshot;
        let mut status_open = serde_json::to_vec(&status_json(s)).expect("JSON of a Value");
        debug_assert_eq!(status_open.last(), Some(&b'}'));
        status_open.pop();
        let cluster = json!({
            "scope": s.scope,
            // False when this node's last etcd read failed: the rest is the
            // view as of its last successful read, which may be stale.
            "dcs_reachable": s.dcs_reachable,
            "leader": s.leader,
            "term": s.leader_revision,
            "members": s.members.iter().map(|m| member_json(s, m)).collect::<Vec<_>>(),
            "synchronous_mode": s.config.as_ref().map(|c| c.synchronous_mode.as_str()),
            "sync": s.sync,
            "scheduled_switchover": s.switchover.as_ref().map(|sw| json!({
                "from": sw.from,
                "to": sw.to,
                "at": sw.at_ms.map(rfc3339),
                "requested_at": rfc3339(sw.requested_ms),
                "force": sw.force,
            })),
        });
        Rendered {
            status_open: Bytes::from(status_open),
            cluster: Bytes::from(serde_json::to_vec(&cluster).expect("JSON of a Value")),
            history: Bytes::from(serde_json::to_vec(&s.history).unwrap_or_else(|_| b"[]".to_vec())),
            config: s
                .config
                .as_ref()
                .and_then(|c| serde_json::to_vec(c).ok())
                .map(Bytes::from),
            snapshot,
        }
    }

    /// This node's state (`/status`, and the body of every health check).
    pub fn status(&self, age: Duration) -> Bytes {
        let mut body = Vec::with_capacity(self.status_open.len() + 96);
        body.extend_from_slice(&self.status_open);
        if body.len() > 1 {
            body.push(b',');
        }
        body.extend_from_slice(b"\"snapshot_age_ms\":");
        body.extend_from_slice(age.as_millis().to_string().as_bytes());
        // As of now, not of the snapshot.
        let s = &self.snapshot;
        let left = |d: Option<Duration>| match d {
            Some(d) => d.saturating_sub(age).as_millis().to_string(),
            None => "null".to_string(),
        };
        body.extend_from_slice(b",\"lease_remaining_ms\":");
        body.extend_from_slice(left(s.lease_remaining).as_bytes());
        body.extend_from_slice(b",\"fencing_remaining_ms\":");
        body.extend_from_slice(left(s.fencing_remaining).as_bytes());
        body.push(b'}');
        Bytes::from(body)
    }
}

/// `state` values of a member whose Postgres runs and answers.
pub fn running(m: &MemberStatus) -> bool {
    matches!(m.state.as_str(), "running" | "streaming")
}

/// The leader's WAL position as its member key last published it (about
/// every `loop_wait`).
fn leader_position<'a>(
    members: &'a [MemberStatus],
    leader: Option<&str>,
) -> Option<(&'a MemberStatus, Lsn)> {
    let leader = members.iter().find(|x| Some(x.name.as_str()) == leader)?;
    Some((leader, leader.wal_position?))
}

/// How far `m` is behind the leader by the WAL it has received or
/// replayed, whichever is further: what promoting `m` now would lose.
/// This is the `lag_bytes` of `/cluster` and `pgha list`.
pub fn lag_bytes(members: &[MemberStatus], leader: Option<&str>, m: &MemberStatus) -> Option<u64> {
    let (leader, top) = leader_position(members, leader)?;
    if m.name == leader.name {
        return Some(0);
    }
    let pos = m.replay_lsn.max(m.receive_lsn).or(m.wal_position)?;
    Some(top.0.saturating_sub(pos.0))
}

/// How far the WAL `m` has replayed is behind the leader: how stale a read
/// on `m` can be. A replica that receives but does not replay (paused, or
/// `recovery_min_apply_delay`) lags here and not in [`lag_bytes`].
pub fn replay_lag_bytes(
    members: &[MemberStatus],
    leader: Option<&str>,
    m: &MemberStatus,
) -> Option<u64> {
    let (leader, top) = leader_position(members, leader)?;
    if m.name == leader.name {
        return Some(0);
    }
    let pos = m.replay_lsn.or(m.wal_position)?;
    Some(top.0.saturating_sub(pos.0))
}

fn member_json(s: &Snapshot, m: &MemberStatus) -> Value {
    let is_leader = s.leader.as_deref() == Some(m.name.as_str());
    let leader = s.leader.as_deref();
    let mut v = json!({
        "name": m.name,
        "role": m.role.to_string(),
        "state": m.state,
        "timeline": m.timeline,
        "leader": is_leader,
        "sync_standby": s.is_sync_standby(&m.name),
        "lag_bytes": lag_bytes(&s.members, leader, m),
        "replay_lag_bytes": replay_lag_bytes(&s.members, leader, m),
        "wal_position": m.wal_position.map(|l| l.to_string()),
        "receive_lsn": m.receive_lsn.map(|l| l.to_string()),
        "replay_lsn": m.replay_lsn.map(|l| l.to_string()),
        "api_url": m.api_url,
        "pg_host": m.pg_host,
        "pg_port": m.pg_port,
        "host": crate::net::host_port(&m.pg_host, m.pg_port),
        "tags": m.tags,
        "nofailover": m.nofailover,
        "noloadbalance": m.noloadbalance,
        "nosync": m.nosync,
        "failover_priority": m.failover_priority,
        "region": m.region,
        "basebackup": m.basebackup,
        "pending_restart": m.pending_restart,
        "replay_paused": m.replay_paused,
        "version": m.version,
    });
    // The router's listeners, absent while it is off.
    let o = v.as_object_mut().expect("member JSON is an object");
    // WAL archiving, on a primary that archives.
    if let Some(a) = &m.archiver {
        let now = crate::clock::epoch_secs();
        o.insert(
            "archiver".into(),
            json!({
                "archived_count": a.archived_count,
                "failed_count": a.failed_count,
                "last_archived_wal": a.last_archived_wal,
                "last_archived_at": a.last_archived_at.map(|t| rfc3339(t * 1000)),
                "last_failed_wal": a.last_failed_wal,
                "last_failed_at": a.last_failed_at.map(|t| rfc3339(t * 1000)),
                "failing_for_s": a.failing_for(now),
            }),
        );
    }
    for (key, listener) in [("router_rw", &m.router_rw), ("router_ro", &m.router_ro)] {
        if let Some(address) = listener {
            o.insert(key.into(), json!(address));
        }
    }
    v
}

fn epoch_seconds_of(instant: std::time::Instant) -> Option<u64> {
    let at = SystemTime::now().checked_sub(instant.elapsed())?;
    at.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// `/status`: this member's entry plus what only this node knows. Also
/// carries the fields Patroni's status has that tools read (`patroni`,
/// `xlog`, `replication_state`, `dcs_last_seen`).
fn status_json(s: &Snapshot) -> Value {
    let me = &s.me;
    let mut v = member_json(s, me);
    let o = v.as_object_mut().expect("member JSON is an object");
    let xlog = match me.role {
        MemberRole::Primary => json!({ "location": me.wal_position.map(|l| l.0) }),
        _ => json!({
            "received_location": me.receive_lsn.map(|l| l.0),
            "replayed_location": me.replay_lsn.map(|l| l.0),
            "paused": me.replay_paused,
        }),
    };
    let extra = [
        ("scope", json!(s.scope)),
        ("cluster_leader", json!(s.leader)),
        ("term", json!(s.leader_revision)),
        ("dcs_reachable", json!(s.dcs_reachable)),
        (
            "dcs_last_seen",
            json!(s.dcs_last_seen.and_then(epoch_seconds_of)),
        ),
        ("pending_restart", json!(s.pending_restart)),
        ("pause", json!(s.paused)),
        (
            "synchronous_mode",
            json!(s.config.as_ref().map(|c| c.synchronous_mode.as_str())),
        ),
        ("synchronous_standbys", json!(s.sync_standbys)),
        ("sync_fallback", json!(s.sync_fallback())),
        ("last_error", json!(s.last_error)),
        ("xlog", xlog),
        (
            "replication_state",
            json!((me.state == "streaming").then_some("streaming")),
        ),
        (
            "patroni",
            json!({ "version": me.version, "scope": s.scope, "name": me.name }),
        ),
    ];
    for (k, val) in extra {
        o.insert(k.into(), val);
    }
    if let Some(route) = &s.route {
        o.insert(
            "router".into(),
            json!({
                "rw": me.router_rw,
                "ro": me.router_ro,
                "primary": route.primary,
                "replicas": route.replicas,
            }),
        );
    }
    v
}
