//! etcd adapter: the cluster's keys under one prefix, leases, transactions
//! that compare what a decision was made under, and a watch that wakes the
//! agent loop. Thin by design: every policy lives in `ha`.

mod fencing;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};

use crate::config::EtcdConfig;
use crate::ha::{
    DcsView, DynamicConfig, InitializeKey, LeaderKey, Lsn, MemberStatus, SwitchoverKey, SyncKey,
    SyncSet, TimelineKey,
};

pub use fencing::LeaderToken;

#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd key {key}: {problem}")]
    BadValue { key: String, problem: String },
}

pub type Result<T> = std::result::Result<T, DcsError>;

/// One entry of the `history` key: a change of leadership.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// `failover` or `switchover`.
    #[serde(default = "failover_kind")]
    pub kind: String,
    pub timeline: Option<u32>,
    pub lsn: Option<Lsn>,
    pub at_ms: u64,
    pub old_leader: Option<String>,
    pub new_leader: String,
    pub reason: String,
}

fn failover_kind() -> String {
    "failover".into()
}

/// Position the leader publishes every loop, outliving its lease.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct LeaderStatus {
    lsn: Lsn,
    timeline: Option<u32>,
}

/// Key layout of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn initialize(&self) -> String {
        format!("{}initialize", self.prefix)
    }
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }
    pub fn members(&self) -> String {
        format!("{}members/", self.prefix)
    }
    pub fn member(&self, name: &str) -> String {
        format!("{}members/{name}", self.prefix)
    }
    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }
    pub fn history(&self) -> String {
        format!("{}history", self.prefix)
    }
    pub fn status(&self) -> String {
        format!("{}status", self.prefix)
    }
    pub fn switchover(&self) -> String {
        format!("{}switchover", self.prefix)
    }
    pub fn sync(&self) -> String {
        format!("{}sync", self.prefix)
    }
    pub fn timeline(&self) -> String {
        format!("{}timeline", self.prefix)
    }
    /// Held (under the holder's own lease) while a base backup runs.
    pub fn backup(&self) -> String {
        format!("{}backup", self.prefix)
    }
}

/// A connection to etcd scoped to one cluster.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    pub keys: Keys,
    timeout: Duration,
}

async fn within<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(DcsError::Timeout(timeout)),
    }
}

impl Etcd {
    /// Connects (lazily: the first request reveals an unreachable etcd).
    pub async fn connect(cfg: &EtcdConfig, timeout: Duration) -> Result<Etcd> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(cfg.dial_timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout);
        if let (Some(user), Some(pw)) = (&cfg.username, &cfg.password) {
            opts = opts.with_user(user.clone(), pw.expose().to_string());
        }
        let client = within(
            cfg.dial_timeout + timeout,
            Client::connect(&cfg.endpoints, Some(opts)),
        )
        .await?;
        Ok(Etcd {
            client,
            keys: Keys {
                prefix: cfg.prefix.clone(),
            },
            timeout,
        })
    }

    /// Reads every key of the cluster in one range request.
    pub async fn load(&self) -> Result<(DcsView, Vec<HistoryEntry>)> {
        let mut c = self.client.clone();
        let resp = within(
            self.timeout,
            c.get(
                self.keys.prefix.as_str(),
                Some(GetOptions::new().with_prefix()),
            ),
        )
        .await?;
        let mut view = DcsView {
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            ..DcsView::default()
        };
        let mut history = Vec::new();
        let members_prefix = self.keys.members();
        for kv in resp.kvs() {
            let key = kv.key_str().unwrap_or_default();
            let value = kv.value();
            let bad = |e: serde_json::Error| DcsError::BadValue {
                key: key.to_string(),
                problem: e.to_string(),
            };
            if key == self.keys.initialize() {
                view.initialize =
                    Some(serde_json::from_slice::<InitializeKey>(value).map_err(bad)?);
            } else if key == self.keys.leader() {
                view.leader = Some(LeaderKey {
                    name: String::from_utf8_lossy(value).into_owned(),
                    lease_id: kv.lease(),
                    mod_revision: kv.mod_revision(),
                });
            } else if key == self.keys.config() {
                // A config an operator mangled by hand must not look like an
                // etcd outage (that would fence the primary): defaults apply.
                match serde_json::from_slice::<DynamicConfig>(value) {
                    Ok(c) => view.config = c,
                    Err(e) => {
                        tracing::warn!(key, error = %e, "unreadable dynamic config: using defaults")
                    }
                }
            } else if key == self.keys.history() {
                match serde_json::from_slice(value) {
                    Ok(h) => history = h,
                    Err(e) => tracing::warn!(key, error = %e, "unreadable history: ignored"),
                }
            } else if key == self.keys.switchover() {
                match serde_json::from_slice::<SwitchoverKey>(value) {
                    Ok(sw) => view.switchover = Some(sw),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "unreadable switchover request: ignored")
                    }
                }
            } else if key == self.keys.sync() {
                // Unreadable: it claims nothing, so it blocks automatic
                // promotion rather than lifting the synchronous rules.
                view.sync = Some(serde_json::from_slice::<SyncKey>(value).unwrap_or_else(|e| {
                    tracing::warn!(key, error = %e, "unreadable sync key: no member counts as synchronous");
                    SyncKey {
                        leader: String::new(),
                        set: SyncSet::none(),
                    }
                }));
            } else if key == self.keys.status() {
                if let Ok(st) = serde_json::from_slice::<LeaderStatus>(value) {
                    view.last_leader_lsn = Some(st.lsn);
                    view.newest_timeline = view.newest_timeline.max(st.timeline);
                }
            } else if key == self.keys.timeline() {
                match serde_json::from_slice::<TimelineKey>(value) {
                    Ok(t) => view.timeline = Some(t),
                    Err(e) => tracing::warn!(key, error = %e, "unreadable timeline key: ignored"),
                }
            } else if key.starts_with(&members_prefix) {
                match serde_json::from_slice::<MemberStatus>(value) {
                    Ok(m) => view.members.push(m),
                    Err(e) => tracing::warn!(key, error = %e, "ignoring unreadable member key"),
                }
            }
        }
        view.members.sort_by(|a, b| a.name.cmp(&b.name));
        let recorded = history
            .iter()
            .filter_map(|h: &HistoryEntry| h.timeline)
            .max();
        view.newest_timeline = view.newest_timeline.max(recorded);
        Ok((view, history))
    }

    /// Create-if-absent; true when this call created the key.
    async fn create(&self, key: String, value: Vec<u8>, lease: Option<i64>) -> Result<bool> {
        let opts = lease.map(|id| PutOptions::new().with_lease(id));
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, opts)]);
        let mut c = self.client.clone();
        Ok(within(self.timeout, c.txn(txn)).await?.succeeded())
    }

    /// Races for the initialize key; true when we won.
    pub async fn claim_initialize(
        &self,
        node: &str,
        system_identifier: Option<u64>,
    ) -> Result<bool> {
        let v = serde_json::to_vec(&InitializeKey {
            node: node.to_string(),
            system_identifier,
        })
        .expect("serializable");
        self.create(self.keys.initialize(), v, None).await
    }

    /// Completes our own initialize claim with the system identifier.
    pub async fn publish_system_identifier(
        &self,
        node: &str,
        system_identifier: u64,
    ) -> Result<bool> {
        let key = self.keys.initialize();
        let pending = serde_json::to_vec(&InitializeKey {
            node: node.to_string(),
            system_identifier: None,
        })
        .expect("serializable");
        let done = serde_json::to_vec(&InitializeKey {
            node: node.to_string(),
            system_identifier: Some(system_identifier),
        })
        .expect("serializable");
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, pending)])
            .and_then([TxnOp::put(key.as_str(), done, None)]);
        let mut c = self.client.clone();
        Ok(within(self.timeout, c.txn(txn)).await?.succeeded())
    }

    /// Read-modify-write of the dynamic config, compare-and-swap on the key's
    /// revision. `change` may refuse (its message is returned as `Refused`).
    pub async fn update_config(
        &self,
        change: impl Fn(&DynamicConfig) -> std::result::Result<DynamicConfig, String>,
    ) -> Result<std::result::Result<DynamicConfig, String>> {
        let key = self.keys.config();
        for _ in 0..5 {
            let mut c = self.client.clone();
            let resp = within(self.timeout, c.get(key.as_str(), None)).await?;
            let (current, rev) = match resp.kvs().first() {
                Some(kv) => (
                    serde_json::from_slice(kv.value()).map_err(|e| DcsError::BadValue {
                        key: key.clone(),
                        problem: e.to_string(),
                    })?,
                    kv.mod_revision(),
                ),
                None => (DynamicConfig::default(), 0),
            };
            let next = match change(&current) {
                Ok(n) => n,
                Err(refused) => return Ok(Err(refused)),
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    serde_json::to_vec(&next).expect("serializable"),
                    None,
                )]);
            if within(self.timeout, c.txn(txn)).await?.succeeded() {
                return Ok(Ok(next));
            }
        }
        Err(DcsError::BadValue {
            key,
            problem: "changed concurrently five times".into(),
        })
    }

    /// Records a switchover request unless one is pending; true when ours won.
    pub async fn request_switchover(&self, sw: &SwitchoverKey) -> Result<bool> {
        self.create(
            self.keys.switchover(),
            serde_json::to_vec(sw).expect("serializable"),
            None,
        )
        .await
    }

    /// Deletes the switchover request; true when there was one.
    pub async fn clear_switchover(&self) -> Result<bool> {
        let mut c = self.client.clone();
        let resp = within(self.timeout, c.delete(self.keys.switchover(), None)).await?;
        Ok(resp.deleted() > 0)
    }

    /// Writes the dynamic config unless one exists.
    pub async fn seed_config(&self, config: &DynamicConfig) -> Result<bool> {
        self.create(
            self.keys.config(),
            serde_json::to_vec(config).expect("serializable"),
            None,
        )
        .await
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<i64> {
        let mut c = self.client.clone();
        Ok(within(
            self.timeout,
            c.lease_grant(ttl.as_secs().max(1) as i64, None),
        )
        .await?
        .id())
    }

    /// One keepalive round trip; false when the lease no longer exists.
    /// Opening the stream already sends a keepalive and waits for its answer
    /// (an error when the lease is gone), so that is the whole renewal: a
    /// second request on the stream cost a second round trip per renewal.
    pub async fn keep_alive(&self, lease_id: i64) -> Result<bool> {
        let mut c = self.client.clone();
        let fut = async move {
            c.lease_keep_alive(lease_id).await?;
            Ok::<_, etcd_client::Error>(true)
        };
        match within(self.timeout, fut).await {
            // etcd answers an expired lease's keepalive with an error.
            Err(DcsError::Etcd(e)) if e.to_string().contains("lease not found") => Ok(false),
            other => other,
        }
    }

    pub async fn revoke_lease(&self, lease_id: i64) -> Result<()> {
        let mut c = self.client.clone();
        within(self.timeout, c.lease_revoke(lease_id))
            .await
            .map(|_| ())
    }

    /// Takes the cluster's backup lock under `lease_id` if nobody holds it
    /// (one base backup at a time across the cluster, also across a
    /// failover); revoking the lease frees it. True when we got it.
    pub async fn claim_backup(&self, holder: &str, lease_id: i64) -> Result<bool> {
        self.create(
            self.keys.backup(),
            holder.as_bytes().to_vec(),
            Some(lease_id),
        )
        .await
    }

    /// Who holds the backup lock, if anyone.
    pub async fn backup_holder(&self) -> Result<Option<String>> {
        let mut c = self.client.clone();
        let resp = within(self.timeout, c.get(self.keys.backup(), None)).await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Takes the leader key if nobody holds it; true when we got it.
    pub async fn acquire_leader(&self, node: &str, lease_id: i64) -> Result<bool> {
        self.create(self.keys.leader(), node.as_bytes().to_vec(), Some(lease_id))
            .await
    }

    /// Deletes the leader key if it is still ours under this lease.
    pub async fn release_leader(&self, node: &str, lease_id: i64) -> Result<bool> {
        let key = self.keys.leader();
        let txn = Txn::new()
            .when(LeaderToken::new(node, lease_id).compares(&key))
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let mut c = self.client.clone();
        Ok(within(self.timeout, c.txn(txn)).await?.succeeded())
    }

    /// Ends a planned handover: deletes our leader key and rewrites the
    /// pending switchover request `sw` as released to `to`, in one
    /// transaction that holds only while the key is ours under this lease
    /// and a switchover request still exists. True when it went through.
    pub async fn hand_over_leader(
        &self,
        node: &str,
        lease_id: i64,
        sw: &SwitchoverKey,
        to: &str,
    ) -> Result<bool> {
        let key = self.keys.leader();
        let sw_key = self.keys.switchover();
        let released = SwitchoverKey {
            released_to: Some(to.to_string()),
            ..sw.clone()
        };
        let [names_us, under_lease] = LeaderToken::new(node, lease_id).compares(&key);
        let txn = Txn::new()
            .when([
                names_us,
                under_lease,
                Compare::create_revision(sw_key.as_str(), CompareOp::Greater, 0),
            ])
            .and_then([
                TxnOp::delete(key.as_str(), None),
                TxnOp::put(
                    sw_key.as_str(),
                    serde_json::to_vec(&released).expect("serializable"),
                    None,
                ),
            ]);
        let mut c = self.client.clone();
        Ok(within(self.timeout, c.txn(txn)).await?.succeeded())
    }

    /// Publishes the leader's WAL position, only while the key is ours under this lease.
    pub async fn publish_leader_status(
        &self,
        node: &str,
        lease_id: i64,
        lsn: Lsn,
        timeline: Option<u32>,
    ) -> Result<bool> {
        let key = self.keys.leader();
        let v = serde_json::to_vec(&LeaderStatus { lsn, timeline }).expect("serializable");
        let txn = Txn::new()
            .when(LeaderToken::new(node, lease_id).compares(&key))
            .and_then([TxnOp::put(self.keys.status(), v, None)]);
        let mut c = self.client.clone();
        Ok(within(self.timeout, c.txn(txn)).await?.succeeded())
    }

    /// Reserves `timeline` for our promotion, only while the leader key is
    /// ours under this lease.
    pub async fn reserve_timeline(&self, node: &str, lease_id: i64, timeline: u32) -> Result<bool> {
        let key = self.keys.leader();
        let v = serde_json::to_vec(&TimelineKey {
            timeline,
            by: node.to_string(),
        })
        .expect("serializable");
        let txn = Txn::new()
            .when(LeaderToken::new(node, lease_id).compares(&key))
            .and_then([TxnOp::put(self.keys.timeline(), v, None)]);
        let mut c = self.client.clone();
        Ok(within(self.timeout, c.txn(txn)).await?.succeeded())
    }

    /// Writes the leader's synchronous claim, only while the key is ours under this lease.
    pub async fn publish_sync(&self, node: &str, lease_id: i64, set: &SyncSet) -> Result<bool> {
        let v = serde_json::to_vec(&SyncKey {
            leader: node.to_string(),
            set: set.clone(),
        })
        .expect("serializable");
        self.if_leader(node, lease_id, TxnOp::put(self.keys.sync(), v, None))
            .await
    }

    /// Deletes the sync key, only while the leader key is ours under this lease.
    pub async fn delete_sync(&self, node: &str, lease_id: i64) -> Result<bool> {
        self.if_leader(node, lease_id, TxnOp::delete(self.keys.sync(), None))
            .await
    }

    async fn if_leader(&self, node: &str, lease_id: i64, op: TxnOp) -> Result<bool> {
        let key = self.keys.leader();
        let txn = Txn::new()
            .when(LeaderToken::new(node, lease_id).compares(&key))
            .and_then([op]);
        let mut c = self.client.clone();
        Ok(within(self.timeout, c.txn(txn)).await?.succeeded())
    }

    /// Appends to the history, compare-and-swap on the history key's revision.
    pub async fn append_history(&self, entry: HistoryEntry) -> Result<()> {
        let key = self.keys.history();
        for _ in 0..5 {
            let mut c = self.client.clone();
            let resp = within(self.timeout, c.get(key.as_str(), None)).await?;
            let (mut list, rev): (Vec<HistoryEntry>, i64) = match resp.kvs().first() {
                Some(kv) => (
                    serde_json::from_slice(kv.value()).unwrap_or_default(),
                    kv.mod_revision(),
                ),
                None => (Vec::new(), 0),
            };
            list.push(entry.clone());
            let txn = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    serde_json::to_vec(&list).expect("serializable"),
                    None,
                )]);
            if within(self.timeout, c.txn(txn)).await?.succeeded() {
                return Ok(());
            }
        }
        Err(DcsError::BadValue {
            key,
            problem: "history changed concurrently five times".into(),
        })
    }

    /// Writes this member's status on its own lease.
    pub async fn put_member(&self, status: &MemberStatus, lease_id: i64) -> Result<()> {
        let mut c = self.client.clone();
        let v = serde_json::to_vec(status).expect("serializable");
        within(
            self.timeout,
            c.put(
                self.keys.member(&status.name),
                v,
                Some(PutOptions::new().with_lease(lease_id)),
            ),
        )
        .await
        .map(|_| ())
    }

    pub async fn delete_member(&self, name: &str) -> Result<()> {
        let mut c = self.client.clone();
        within(self.timeout, c.delete(self.keys.member(name), None))
            .await
            .map(|_| ())
    }

    /// Watches the cluster prefix from `revision` and sends a unit on every
    /// change that can alter a decision or the route (leader, initialize,
    /// config, switchover, sync, a member's role or state), until the
    /// receiver is dropped; returns when the stream ends. Members republish
    /// their keys every loop: those puts alone wake nothing.
    pub async fn watch(&self, revision: i64, wake: tokio::sync::mpsc::Sender<()>) -> Result<()> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        let (_watcher, mut stream) =
            within(self.timeout, c.watch(self.keys.prefix.as_str(), Some(opts))).await?;
        let members = self.keys.members();
        let mut roles = RolesSeen::default();
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                break;
            }
            let mut relevant = false;
            for ev in resp.events() {
                let Some((k, kv)) = ev.kv().and_then(|kv| Some((kv.key_str().ok()?, kv))) else {
                    continue;
                };
                relevant |= k == self.keys.leader()
                    || k == self.keys.initialize()
                    || k == self.keys.config()
                    || k == self.keys.switchover()
                    || k == self.keys.sync();
                // Members republish every pass: only a change of role or
                // state wakes us (a new primary's key moves every router).
                if let Some(name) = k.strip_prefix(members.as_str()) {
                    let value =
                        (ev.event_type() == etcd_client::EventType::Put).then(|| kv.value());
                    relevant |= roles.changed(name, value);
                }
            }
            if relevant && wake.send(()).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// Each member's role and state as its key last said, so that a watch
/// wakes the loop on a change of either and not on every republication.
#[derive(Debug, Default)]
struct RolesSeen(std::collections::HashMap<String, (String, String)>);

impl RolesSeen {
    /// `value`: the member key's new JSON, `None` when it was deleted.
    fn changed(&mut self, name: &str, value: Option<&[u8]>) -> bool {
        #[derive(Deserialize)]
        struct RoleOf {
            #[serde(default)]
            role: String,
            #[serde(default)]
            state: String,
        }
        match value {
            None => self.0.remove(name).is_some(),
            Some(json) => {
                let Ok(m) = serde_json::from_slice::<RoleOf>(json) else {
                    return false;
                };
                let now = (m.role, m.state);
                self.0.insert(name.to_string(), now.clone()) != Some(now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RolesSeen;

    #[test]
    fn a_member_key_wakes_the_loop_only_when_its_role_or_state_changes() {
        let mut seen = RolesSeen::default();
        let key = |role: &str, state: &str, lsn: u64| {
            format!(r#"{{"role":"{role}","state":"{state}","wal_position":{lsn}}}"#).into_bytes()
        };
        assert!(
            seen.changed("n1", Some(&key("replica", "streaming", 1))),
            "first sight"
        );
        assert!(
            !seen.changed("n1", Some(&key("replica", "streaming", 2))),
            "a new position only"
        );
        assert!(
            seen.changed("n1", Some(&key("primary", "running", 3))),
            "promoted"
        );
        assert!(seen.changed("n1", Some(&key("primary", "stopping", 3))));
        assert!(!seen.changed("n1", Some(b"not json")));
        assert!(seen.changed("n1", None), "gone");
        assert!(!seen.changed("n1", None));
    }
}
