//! Failsafe mode: a leader that cannot reach etcd may keep its primary only
//! while every member it last saw in etcd confirms, over the API, that it
//! cannot reach etcd either and still follows that leader.
//!
//! A replica that confirms makes a promise: it takes no part in an election
//! for one lease TTL afterwards, so the leader, which counts the confirmation
//! as a lease renewal sent at the moment it asked, is the only node that may
//! take writes until its (extended) fencing deadline. Replicas never promote
//! without etcd in any mode.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The body of `POST /failsafe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailsafeRequest {
    /// The leader asking.
    pub leader: String,
}

/// What a replica knows when it is asked, taken from its latest pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView<'a> {
    pub node: &'a str,
    /// The last etcd read of this node succeeded.
    pub dcs_reachable: bool,
    /// The leader it last saw in etcd.
    pub leader: Option<&'a str>,
    /// Its Postgres runs as a replica.
    pub is_replica: bool,
}

/// The promise a replica made by confirming: no election before `until`.
#[derive(Debug, Default)]
pub struct Promise {
    until: Mutex<Option<Instant>>,
}

impl Promise {
    /// Answers a leader's request: `Ok` (and a promise for `ttl`) when this
    /// node cannot reach etcd either and follows that leader.
    pub fn confirm(
        &self,
        me: &ReplicaView<'_>,
        request: &FailsafeRequest,
        ttl: Duration,
        now: Instant,
    ) -> Result<(), String> {
        if me.dcs_reachable {
            return Err(format!(
                "{} reaches etcd: the leader must renew its key there",
                me.node
            ));
        }
        if me.leader != Some(request.leader.as_str()) {
            return Err(format!(
                "{} follows {}, not {}",
                me.node,
                me.leader.unwrap_or("no leader"),
                request.leader
            ));
        }
        if !me.is_replica {
            return Err(format!("{} does not run as a replica", me.node));
        }
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let new = now + ttl;
        *until = Some(until.map_or(new, |u| u.max(new)));
        Ok(())
    }

    /// Until when this node promised not to take part in an election.
    pub fn until(&self) -> Option<Instant> {
        *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(dcs_reachable: bool, leader: Option<&str>) -> ReplicaView<'_> {
        ReplicaView {
            node: "n2",
            dcs_reachable,
            leader,
            is_replica: true,
        }
    }

    #[test]
    fn confirms_only_without_etcd_and_for_its_own_leader() {
        let p = Promise::default();
        let ask = FailsafeRequest {
            leader: "n1".into(),
        };
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        assert!(p.confirm(&view(true, Some("n1")), &ask, ttl, now).is_err());
        assert!(p.confirm(&view(false, Some("n3")), &ask, ttl, now).is_err());
        assert!(p.confirm(&view(false, None), &ask, ttl, now).is_err());
        assert_eq!(p.until(), None, "a refusal promises nothing");
        p.confirm(&view(false, Some("n1")), &ask, ttl, now).unwrap();
        assert_eq!(p.until(), Some(now + ttl));
        // A later confirmation extends, an earlier one never shortens.
        p.confirm(&view(false, Some("n1")), &ask, ttl, now - ttl)
            .unwrap();
        assert_eq!(p.until(), Some(now + ttl));
    }
}
