//! What the agent observed, as plain data: the local Postgres, the etcd view
//! and this node's own lease bookkeeping. `decide` reads only this, so every
//! decision can be replayed from a recorded observation.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds on the agent's monotonic clock. The core never reads a clock;
/// the caller passes `now` and every deadline in this unit.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Tick(pub u64);

impl Tick {
    pub fn plus_ms(self, ms: u64) -> Tick {
        Tick(self.0.saturating_add(ms))
    }
    pub fn since(self, earlier: Tick) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// A WAL position.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses Postgres' `X/Y` notation.
    pub fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.split_once('/')?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return None;
        }
        Some(Lsn(hi << 32 | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Role of a running Postgres, as Postgres itself reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgRole {
    Primary,
    Replica,
}

/// The local Postgres as last probed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalPostgres {
    /// A postmaster runs and answers queries.
    pub running: bool,
    pub role: Option<PgRole>,
    pub timeline: Option<u32>,
    /// Primary: current write position. Replica: last replayed position.
    pub wal_position: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// Replica: WAL replay is paused (`pg_wal_replay_pause()`, a recovery
    /// target): not a failover candidate until it is resumed.
    pub replay_paused: bool,
    /// Replica: the WAL receiver streams from this `host:port`.
    pub streaming_from: Option<String>,
    /// Replica: `primary_conninfo` names this member as its upstream.
    pub following: Option<String>,
    /// Primary: names of the physical replication slots that exist.
    pub slots: Vec<String>,
    /// Settings changed that take effect only after a restart.
    pub pending_restart: bool,
    /// Primary: `synchronous_standby_names` in effect, when it is one the
    /// agent writes (`None`: something else, or not probed).
    pub sync_standbys: Option<SyncSet>,
    /// Primary: its WAL senders (`pg_stat_replication`).
    pub replication: Vec<Replication>,
    /// Primary with archive_mode on: what `pg_stat_archiver` says.
    pub archiver: Option<Archiver>,
}

/// WAL archiving as `pg_stat_archiver` counts it (since the last stats
/// reset), times in Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Archiver {
    pub archived_count: u64,
    pub failed_count: u64,
    pub last_archived_wal: Option<String>,
    pub last_archived_at: Option<u64>,
    pub last_failed_wal: Option<String>,
    pub last_failed_at: Option<u64>,
}

impl Archiver {
    /// Failing: the last attempt failed after the last success (or nothing
    /// was archived yet). Seconds since the last success (or the first
    /// failure), at `now`.
    pub fn failing_for(&self, now: u64) -> Option<u64> {
        let failed = self.last_failed_at?;
        match self.last_archived_at {
            Some(ok) if ok >= failed => None,
            Some(ok) => Some(now.saturating_sub(ok)),
            None => Some(now.saturating_sub(failed)),
        }
    }
}

/// One WAL sender on the primary, as `pg_stat_replication` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    /// `application_name`: the member's name.
    pub name: String,
    /// `streaming`, `catchup`, `backup`, ...
    pub state: String,
    pub flush_lsn: Lsn,
}

/// A set of standbys and how many of them hold every acknowledged commit.
///
/// As `synchronous_standby_names` it tells Postgres whom to wait for (`ANY
/// quorum (members)`); published in etcd (the `sync` key) it is the leader's
/// claim that every commit it acknowledged is on at least `quorum` of
/// `members`. `quorum == 0` claims nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SyncSet {
    /// Sorted member names; `*` (Postgres' "any standby") only in
    /// `synchronous_standby_names`, never in a published claim that allows
    /// a promotion.
    pub members: Vec<String>,
    pub quorum: u32,
}

impl SyncSet {
    pub fn new(mut members: Vec<String>, quorum: u32) -> SyncSet {
        members.sort();
        members.dedup();
        let quorum = quorum.min(members.len() as u32);
        SyncSet { members, quorum }
    }

    pub fn none() -> SyncSet {
        SyncSet::default()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.members.iter().any(|m| m == name)
    }

    /// Every commit that satisfies `self` also satisfies `other`: holding
    /// on `quorum` of our members puts it on enough of `other`'s.
    pub fn implies(&self, other: &SyncSet) -> bool {
        if other.quorum == 0 {
            return true;
        }
        if self.members.iter().any(|m| m == "*") {
            return false;
        }
        let outside = self.members.iter().filter(|m| !other.contains(m)).count() as u32;
        self.quorum.saturating_sub(outside) >= other.quorum
    }

    /// The strongest claim both `self` and `other` guarantee.
    pub fn weakest_of(&self, other: &SyncSet) -> SyncSet {
        let mut members = self.members.clone();
        members.extend(other.members.iter().cloned());
        let quorum = self.quorum.min(other.quorum);
        SyncSet::new(members, quorum)
    }
}

impl fmt::Display for SyncSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.quorum == 0 || self.members.is_empty() {
            return f.write_str("none");
        }
        write!(f, "{} of [{}]", self.quorum, self.members.join(","))
    }
}

/// `synchronous_mode` in the dynamic config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Asynchronous replication.
    #[default]
    Off,
    /// The leader picks `synchronous_node_count` standbys; falls back to
    /// asynchronous when none is available.
    On,
    /// As `On`, but never falls back: commits wait instead.
    Strict,
    /// `ANY n (all healthy standbys)`.
    Quorum,
}

impl SyncMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Off => "off",
            SyncMode::On => "on",
            SyncMode::Strict => "strict",
            SyncMode::Quorum => "quorum",
        }
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for SyncMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SyncMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SyncMode, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(false) => Ok(SyncMode::Off),
            Raw::Bool(true) => Ok(SyncMode::On),
            Raw::Text(t) => match t.as_str() {
                "off" | "false" => Ok(SyncMode::Off),
                "on" | "true" => Ok(SyncMode::On),
                "strict" => Ok(SyncMode::Strict),
                "quorum" => Ok(SyncMode::Quorum),
                other => Err(serde::de::Error::custom(format!(
                    "expected one of off, on, strict, quorum, got {other:?}"
                ))),
            },
        }
    }
}

/// The `sync` key: which standbys the leader's acknowledged commits are on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncKey {
    /// The leader that published it.
    pub leader: String,
    #[serde(flatten)]
    pub set: SyncSet,
}

/// The agent's record of the last `synchronous_standby_names` it applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncApplied {
    pub set: SyncSet,
    pub at: Tick,
    /// The primary's WAL position from the first probe a safe while after
    /// the reload: every commit acknowledged after it waited for `set`.
    pub mark: Option<Lsn>,
}

/// What is in the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    /// Missing or empty: safe to initdb or clone into.
    Empty,
    /// A Postgres cluster with this system identifier.
    Initialized { system_identifier: u64 },
    /// Not empty and not a usable Postgres cluster: never touched.
    Unusable,
}

/// The `initialize` key: who bootstraps the cluster, and once done, its system identifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitializeKey {
    pub node: String,
    pub system_identifier: Option<u64>,
}

/// The `leader` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    pub name: String,
    pub lease_id: i64,
    /// Revision of the key's last modification: the fencing token of this term.
    pub mod_revision: i64,
}

impl LeaderKey {
    /// The key names `node` and is bound to `lease_id`: the leader's
    /// fencing token, as etcd's guards compare it (`dcs::LeaderToken`).
    pub fn is_held_by(&self, node: &str, lease_id: i64) -> bool {
        self.name == node && self.lease_id == lease_id
    }
}

/// Role a member publishes about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    Primary,
    Replica,
    Uninitialized,
}

impl fmt::Display for MemberRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemberRole::Primary => "primary",
            MemberRole::Replica => "replica",
            MemberRole::Uninitialized => "uninitialized",
        })
    }
}

/// Progress of a running clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// The JSON every member keeps under `members/<name>`, bound to its own lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub role: MemberRole,
    /// `running`, `stopped`, `starting`, `initializing`, `cloning`, `crashed`, ...
    pub state: String,
    pub timeline: Option<u32>,
    pub wal_position: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub pg_host: String,
    pub pg_port: u16,
    pub api_url: String,
    #[serde(default)]
    pub nofailover: bool,
    #[serde(default)]
    pub noloadbalance: bool,
    #[serde(default)]
    pub nosync: bool,
    #[serde(default)]
    pub failover_priority: i32,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Set while a clone is running.
    #[serde(default)]
    pub basebackup: Option<Progress>,
    /// Postgres has settings that take effect only after a restart.
    #[serde(default)]
    pub pending_restart: bool,
    /// Replica: WAL replay is paused.
    #[serde(default)]
    pub replay_paused: bool,
    /// Where this member's router takes read-write connections
    /// (`host:port`); absent when its router is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_rw: Option<String>,
    /// Where this member's router takes read-only connections, if it has
    /// that listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_ro: Option<String>,
    /// Primary with archiving on: its archiver's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archiver: Option<Archiver>,
    /// Milliseconds since the Unix epoch of this status.
    pub updated_at_ms: u64,
    pub version: String,
}

/// Cluster-wide settings kept in the `config` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicConfig {
    /// Maintenance mode: no automatic failover, no automatic restarts.
    pub paused: bool,
    pub maximum_lag_on_failover: u64,
    pub primary_start_timeout_ms: u64,
    pub member_slot_grace_ms: u64,
    /// Only members of this region may be promoted.
    pub primary_region: Option<String>,
    /// Reclone a former primary whose rewind failed.
    pub auto_reinit: bool,
    /// A leader that cannot reach etcd keeps its primary while every member
    /// confirms over the API (see `failsafe`).
    pub failsafe_mode: bool,
    pub synchronous_mode: SyncMode,
    /// Standbys the primary waits for (`on`, `strict`), or the `n` of `ANY n` (`quorum`).
    pub synchronous_node_count: u32,
    /// Postgres parameters for every member, applied by reload (a member's
    /// own `[postgresql.parameters]` win). Numbers and booleans are taken
    /// as their text.
    #[serde(deserialize_with = "parameter_values")]
    pub parameters: BTreeMap<String, String>,
}

fn parameter_values<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Text(String),
        Number(serde_json::Number),
        Bool(bool),
    }
    let raw = BTreeMap::<String, Value>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::Text(t) => t,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => if b { "on" } else { "off" }.to_string(),
            };
            (k, v)
        })
        .collect())
}

impl Default for DynamicConfig {
    fn default() -> Self {
        DynamicConfig {
            paused: false,
            maximum_lag_on_failover: 1024 * 1024,
            primary_start_timeout_ms: 30_000,
            member_slot_grace_ms: 30_000,
            primary_region: None,
            auto_reinit: false,
            failsafe_mode: false,
            synchronous_mode: SyncMode::Off,
            synchronous_node_count: 1,
            parameters: BTreeMap::new(),
        }
    }
}

/// The `switchover` key: a planned change of leader, requested by an
/// operator or by a leader that is shutting down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverKey {
    /// The leader that hands over.
    pub from: String,
    /// The member that takes over; `None` lets the best replica take it.
    pub to: Option<String>,
    /// Not before this wall-clock time (ms since the Unix epoch).
    pub at_ms: Option<u64>,
    /// When it was requested (ms since the Unix epoch).
    pub requested_ms: u64,
    /// Forced failover: the leader stops and releases without waiting for
    /// the target to confirm its WAL, and the target need not be healthy.
    #[serde(default)]
    pub force: bool,
    /// Set by the leader in the same transaction that deletes its key once
    /// the named target confirmed every byte of WAL up to the leader's
    /// shutdown checkpoint. Only this member may then take the key as the
    /// switchover's target; without it (the leader's lease ran out during
    /// the handover) the election's usual proofs apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_to: Option<String>,
}

/// Everything read from etcd in one consistent range read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DcsView {
    pub revision: i64,
    pub initialize: Option<InitializeKey>,
    pub leader: Option<LeaderKey>,
    pub members: Vec<MemberStatus>,
    pub config: DynamicConfig,
    /// WAL position the leader last published under `status`.
    pub last_leader_lsn: Option<Lsn>,
    pub switchover: Option<SwitchoverKey>,
    /// The `sync` key.
    pub sync: Option<SyncKey>,
    /// The `timeline` key: the timeline the last promotion reserved.
    pub timeline: Option<TimelineKey>,
    /// Highest timeline etcd knows of otherwise: the leader's `status`
    /// and the `history` of promotions.
    pub newest_timeline: Option<u32>,
}

/// A timeline reserved by the leader before it promoted, so that no later
/// promotion elsewhere picks the same number. Without a WAL archive a
/// standby knows only the timelines it streamed; Postgres would promote it
/// to the next free number it sees locally, and two histories with one
/// number make pg_rewind take them for the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineKey {
    pub timeline: u32,
    /// The member that reserved it.
    pub by: String,
}

impl DcsView {
    pub fn member(&self, name: &str) -> Option<&MemberStatus> {
        self.members.iter().find(|m| m.name == name)
    }
}

/// Whether a member of region `r` may lead under the cluster's primary_region.
pub fn candidacy_region_ok(dcs: &DcsView, r: &Option<String>) -> bool {
    dcs.config
        .primary_region
        .as_ref()
        .is_none_or(|p| r.as_ref() == Some(p))
}

/// A leader lease this agent holds and keeps alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLease {
    pub lease_id: i64,
    /// When the last successful keepalive (or the grant) was *sent*.
    pub renewed_at: Tick,
}

/// Why a background job did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// It changed nothing and can be tried again as it is: its source was
    /// not reachable (a rewind source whose Postgres is not up yet).
    Retry(String),
    /// It ran and failed.
    Failed(String),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Retry(e) => write!(f, "{e} (nothing changed: tried again)"),
            JobError::Failed(e) => f.write_str(e),
        }
    }
}

impl From<String> for JobError {
    fn from(e: String) -> JobError {
        JobError::Failed(e)
    }
}

/// A long-running job the executor runs in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    InitDb,
    Clone,
    Start,
    Stop,
    Rewind,
}

/// A slot on the primary whose member is no longer in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanSlot {
    pub name: String,
    pub missing_since: Tick,
}

/// Since when (by this node's clock) each member has been seen in etcd
/// without any WAL position: what bounds the election's wait for a member
/// that is `starting`. HA memory kept across passes: the agent and the
/// simulator call `observe` with every etcd view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberWaits {
    since: BTreeMap<String, Tick>,
}

impl MemberWaits {
    pub fn observe(&mut self, dcs: &DcsView, now: Tick) {
        let without_position = |m: &MemberStatus| {
            m.wal_position.is_none() && m.receive_lsn.is_none() && m.replay_lsn.is_none()
        };
        self.since
            .retain(|name, _| dcs.member(name).is_some_and(without_position));
        for m in dcs.members.iter().filter(|m| without_position(m)) {
            self.since.entry(m.name.clone()).or_insert(now);
        }
    }

    /// How long `member` has been without a WAL position, 0 when it has one.
    pub fn waited_ms(&self, member: &str, now: Tick) -> u64 {
        self.since.get(member).map_or(0, |t| now.since(*t))
    }
}

/// A member's WAL position as its own API reported it just now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPosition {
    pub name: String,
    pub timeline: Option<u32>,
    /// Received (or replayed, whichever is further).
    pub lsn: Lsn,
    /// Replayed.
    pub replay_lsn: Lsn,
    pub replay_paused: bool,
    /// The member's answer came from a pass in which it, too, saw no
    /// leader: its WAL position is from after the old primary stopped.
    /// Only such answers count towards a synchronous promotion proof.
    pub saw_no_leader: bool,
}

/// A handover under way: since when, and to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    pub since: Tick,
    pub to: String,
    /// Forced: the target may lack some of our WAL, so we rewind before following.
    pub force: bool,
}

/// How this node takes part in elections and routing (the `[tags]`
/// section of its configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags {
    pub nofailover: bool,
    pub noloadbalance: bool,
    pub nosync: bool,
    pub failover_priority: i32,
    /// Free-form tags, as in `tags.extra = { zone = "a" }`.
    pub extra: BTreeMap<String, String>,
}

/// One observation: the only input of `decide` besides config and `now`.
#[derive(Debug, Clone)]
pub struct Observation {
    pub node: String,
    pub tags: Tags,
    pub region: Option<String>,
    /// This node may take part in the bootstrap race (region permitting).
    pub may_bootstrap: bool,
    pub data_dir: DataDir,
    pub local: LocalPostgres,
    /// `None` when etcd could not be read in this pass.
    pub dcs: Option<DcsView>,
    /// The leader lease this agent keeps alive, if any.
    pub leader_lease: Option<HeldLease>,
    /// A background job still running.
    pub job: Option<Job>,
    /// The running `Start` job starts Postgres as a standby. Its postmaster
    /// may run for long before it accepts connections (a standby that must
    /// replay WAL to become consistent), and only its upstream can send it
    /// that WAL.
    pub starting_standby: bool,
    /// The local Postgres was last seen running at this instant (for crash timeouts).
    pub pg_down_since: Option<Tick>,
    pub orphan_slots: Vec<OrphanSlot>,
    /// Role the stopped data directory last ran in (standby.signal, control data).
    pub last_role: Option<PgRole>,
    /// Since when the running standby has an upstream but does not stream from it.
    pub replica_stalled_since: Option<Tick>,
    /// The data directory must be rewound before it runs as a replica again.
    pub needs_rewind: bool,
    /// The last pg_rewind failed.
    pub rewind_failed: bool,
    /// A rewind was interrupted (or failed) part way: the data directory
    /// must not start before a rewind against a leader succeeds (the
    /// marker beside the data directory, see `postgres::JobMarker`).
    pub rewind_pending: bool,
    /// Since when each member has been seen without a WAL position.
    pub member_waits: MemberWaits,
    /// Positions of the running replicas whose APIs answered, asked while no
    /// leader exists or while we hand over; `None` when not asked (positions
    /// from etcd are used).
    pub peers: Option<Vec<PeerPosition>>,
    /// Wall clock, ms since the Unix epoch (only for scheduled switchovers).
    pub wall_ms: u64,
    /// We stopped our primary to hand leadership over.
    pub handover: Option<Handover>,
    /// Stopped data directory of a primary that shut down cleanly: its
    /// shutdown checkpoint, the last record of its WAL. `None` after a crash
    /// or an immediate stop, where WAL may follow the last checkpoint.
    pub checkpoint_lsn: Option<Lsn>,
    /// The agent is shutting down: start nothing, hand over if leading.
    pub shutting_down: bool,
    /// The last `synchronous_standby_names` this agent applied.
    pub sync_applied: Option<SyncApplied>,
    /// We confirmed our leader in failsafe mode: no election before this.
    pub failsafe_promise_until: Option<Tick>,
    /// A member whose API just said it runs Postgres as primary (asked
    /// with `peers`).
    pub live_primary: Option<String>,
    /// When this node last stopped its Postgres as a primary (its health
    /// checks turned 503 on `/primary` then).
    pub primary_ended_at: Option<Tick>,
}

#[cfg(test)]
mod archiver_tests {
    use super::Archiver;

    #[test]
    fn archiving_fails_from_a_failure_after_the_last_success() {
        let mut a = Archiver::default();
        assert_eq!(a.failing_for(100), None);
        a.last_failed_at = Some(90);
        assert_eq!(
            a.failing_for(100),
            Some(10),
            "never archived, failing since 90"
        );
        a.last_archived_at = Some(95);
        assert_eq!(a.failing_for(100), None, "archived after the failure");
        a.last_failed_at = Some(97);
        assert_eq!(a.failing_for(130), Some(35), "no success since 95");
    }
}
