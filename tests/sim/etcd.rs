//! Simulated etcd with the semantics pgha relies on: one revision counter,
//! leases that expire at simulated time and take their keys with them,
//! create-if-absent transactions and transactions comparing a key's value
//! and lease. Values are typed instead of JSON bytes.

use std::collections::BTreeMap;

use pgha::ha::{
    DcsView, DynamicConfig, InitializeKey, LeaderKey, Lsn, MemberStatus, SwitchoverKey, SyncKey,
    TimelineKey,
};

#[derive(Debug, Clone)]
pub enum Value {
    Leader(String),
    Initialize(InitializeKey),
    Member(Box<MemberStatus>),
    Config(DynamicConfig),
    /// The leader's WAL position and timeline.
    Status(Lsn, Option<u32>),
    Timeline(TimelineKey),
    Switchover(SwitchoverKey),
    Sync(SyncKey),
}

#[derive(Debug, Clone)]
struct Kv {
    value: Value,
    mod_revision: i64,
    /// 0: no lease.
    lease: i64,
}

#[derive(Debug, Clone)]
struct Lease {
    ttl_ms: u64,
    expires_at: u64,
}

/// Errors etcd answers with (as opposed to a lost request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdError {
    LeaseNotFound,
}

#[derive(Debug, Default)]
pub struct Etcd {
    revision: i64,
    kv: BTreeMap<String, Kv>,
    leases: BTreeMap<i64, Lease>,
    next_lease: i64,
    /// Revision of the last change the agents' watch wakes on.
    watched_revision: i64,
}

/// Keys whose changes wake the agents (as `Etcd::watch`): members and
/// status change every loop and are read on the next tick instead.
fn watched(key: &str) -> bool {
    matches!(
        key,
        "leader" | "initialize" | "config" | "switchover" | "sync"
    )
}

pub const LEADER: &str = "leader";
pub const SYNC: &str = "sync";
pub const STATUS: &str = "status";
pub const SWITCHOVER: &str = "switchover";
pub const TIMELINE: &str = "timeline";

pub fn member_key(name: &str) -> String {
    format!("members/{name}")
}

impl Etcd {
    pub fn new() -> Etcd {
        Etcd {
            revision: 1,
            next_lease: 0x1000,
            ..Etcd::default()
        }
    }

    pub fn watched_revision(&self) -> i64 {
        self.watched_revision
    }

    fn touched(&mut self, key: &str) {
        if watched(key) {
            self.watched_revision = self.revision;
        }
    }

    /// Expires every lease whose TTL ran out at `now`, deleting its keys.
    /// Returns the names of the leases' deleted keys.
    pub fn expire(&mut self, now: u64) -> Vec<String> {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut gone = Vec::new();
        for id in expired {
            gone.extend(self.revoke(id));
        }
        gone
    }

    pub fn grant(&mut self, now: u64, ttl_ms: u64) -> i64 {
        self.next_lease += 1;
        let id = self.next_lease;
        self.leases.insert(
            id,
            Lease {
                ttl_ms,
                expires_at: now + ttl_ms,
            },
        );
        id
    }

    /// False when the lease no longer exists.
    pub fn keep_alive(&mut self, now: u64, id: i64) -> bool {
        match self.leases.get_mut(&id) {
            Some(l) => {
                l.expires_at = now + l.ttl_ms;
                true
            }
            None => false,
        }
    }

    pub fn lease_alive(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Revokes a lease; returns the keys deleted with it.
    pub fn revoke(&mut self, id: i64) -> Vec<String> {
        if self.leases.remove(&id).is_none() {
            return Vec::new();
        }
        let keys: Vec<String> = self
            .kv
            .iter()
            .filter(|(_, kv)| kv.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() {
            self.revision += 1;
            for k in &keys {
                self.kv.remove(k);
                self.touched(k);
            }
        }
        keys
    }

    fn put_raw(&mut self, key: &str, value: Value, lease: i64) {
        self.touched(key);
        self.kv.insert(
            key.to_string(),
            Kv {
                value,
                mod_revision: self.revision,
                lease,
            },
        );
    }

    /// A plain put (its own transaction).
    pub fn put(&mut self, key: &str, value: Value, lease: Option<i64>) -> Result<(), EtcdError> {
        let lease = lease.unwrap_or(0);
        if lease != 0 && !self.lease_alive(lease) {
            return Err(EtcdError::LeaseNotFound);
        }
        self.revision += 1;
        self.put_raw(key, value, lease);
        Ok(())
    }

    pub fn delete(&mut self, key: &str) -> bool {
        if self.kv.contains_key(key) {
            self.revision += 1;
            self.kv.remove(key);
            self.touched(key);
            true
        } else {
            false
        }
    }

    /// `txn(create_revision(key) == 0).then(put(key, value, lease))`.
    pub fn create(
        &mut self,
        key: &str,
        value: Value,
        lease: Option<i64>,
    ) -> Result<bool, EtcdError> {
        if self.kv.contains_key(key) {
            return Ok(false);
        }
        self.put(key, value, lease).map(|()| true)
    }

    /// The leader key holds `node` under `lease`: the compare of every
    /// leadership-dependent write.
    pub fn is_leader(&self, node: &str, lease: i64) -> bool {
        self.kv.get(LEADER).is_some_and(|kv| {
            matches!(&kv.value, Value::Leader(n) if n == node) && kv.lease == lease
        })
    }

    pub fn leader_name(&self) -> Option<String> {
        match self.kv.get(LEADER).map(|kv| &kv.value) {
            Some(Value::Leader(n)) => Some(n.clone()),
            _ => None,
        }
    }

    /// Who published the `sync` key.
    pub fn sync_leader(&self) -> Option<&str> {
        match self.kv.get(SYNC).map(|kv| &kv.value) {
            Some(Value::Sync(k)) => Some(k.leader.as_str()),
            _ => None,
        }
    }

    /// `txn(value(leader) == node && lease(leader) == lease).then(put(key))`.
    pub fn put_if_leader(&mut self, node: &str, lease: i64, key: &str, value: Value) -> bool {
        if !self.is_leader(node, lease) {
            return false;
        }
        self.revision += 1;
        self.put_raw(key, value, 0);
        true
    }

    /// `txn(value(leader) == node && lease(leader) == lease).then(delete(key))`.
    pub fn delete_if_leader(&mut self, node: &str, lease: i64, key: &str) -> bool {
        if !self.is_leader(node, lease) {
            return false;
        }
        self.revision += 1;
        self.kv.remove(key);
        self.touched(key);
        true
    }

    /// `txn(value(leader) == node && lease(leader) == lease &&
    /// create_revision(switchover) > 0).then(delete(leader),
    /// put(switchover, sw released to `to`))`: one revision for both.
    pub fn hand_over(&mut self, node: &str, lease: i64, sw: &SwitchoverKey, to: &str) -> bool {
        if !self.is_leader(node, lease) || !self.kv.contains_key(SWITCHOVER) {
            return false;
        }
        self.revision += 1;
        self.kv.remove(LEADER);
        self.touched(LEADER);
        let released = SwitchoverKey {
            released_to: Some(to.to_string()),
            ..sw.clone()
        };
        self.put_raw(SWITCHOVER, Value::Switchover(released), 0);
        true
    }

    /// One consistent range read of the cluster prefix.
    pub fn view(&self) -> DcsView {
        let mut v = DcsView {
            revision: self.revision,
            ..DcsView::default()
        };
        for (key, kv) in &self.kv {
            match &kv.value {
                Value::Leader(name) => {
                    v.leader = Some(LeaderKey {
                        name: name.clone(),
                        lease_id: kv.lease,
                        mod_revision: kv.mod_revision,
                    })
                }
                Value::Initialize(i) => v.initialize = Some(i.clone()),
                Value::Member(m) if key.starts_with("members/") => v.members.push((**m).clone()),
                Value::Member(_) => {}
                Value::Config(c) => v.config = c.clone(),
                Value::Status(lsn, timeline) => {
                    v.last_leader_lsn = Some(*lsn);
                    v.newest_timeline = v.newest_timeline.max(*timeline);
                }
                Value::Timeline(t) => v.timeline = Some(t.clone()),
                Value::Switchover(s) => v.switchover = Some(s.clone()),
                Value::Sync(s) => v.sync = Some(s.clone()),
            }
        }
        v
    }
}
