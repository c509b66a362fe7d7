//! What `decide` asks the executor to do. Every step carries the reason it was
//! chosen; the agent logs it and keeps it for the history.

use std::fmt;

/// One thing to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Race for the `initialize` key (create-if-absent transaction).
    ClaimInitialize { system_identifier: Option<u64> },
    /// Run initdb into the empty data directory (we won the initialize race).
    InitDb,
    /// Record the new cluster's system identifier in our `initialize` key.
    PublishSystemIdentifier { system_identifier: u64 },
    /// pg_basebackup from this member into the empty data directory.
    Clone { from: String },
    /// pg_rewind the stopped former primary against this member.
    Rewind { from: String },
    /// Move the data directory aside (never deleted) so that it is recloned.
    MoveAside,
    /// Start Postgres as a primary (no standby.signal).
    StartPrimary,
    /// Start Postgres as a standby following `upstream` (or none yet).
    StartReplica { upstream: Option<String> },
    /// Point the running standby at another upstream.
    Follow { upstream: String },
    /// Take the leader key with a fresh lease (create-if-absent transaction).
    AcquireLeader,
    /// Keep our leader lease alive.
    RenewLeader { lease_id: i64 },
    /// Delete our leader key (compare: it is still ours) and revoke its lease.
    ReleaseLeader,
    /// Planned handover confirmed: delete our leader key and mark the
    /// `switchover` key released to `to`, in one transaction (compare: the
    /// leader key is still ours and the switchover is still pending).
    HandOverKey { to: String },
    /// Record `timeline` in the `timeline` key (compare: we hold the leader
    /// key), raised past any timeline history the local pg_wal holds. When
    /// it fails, the rest of the pass is skipped.
    ReserveTimeline { timeline: u32 },
    /// Promote the local standby to the timeline reserved for it (at least
    /// `timeline`); we hold the leader key.
    Promote { timeline: u32 },
    /// Stop Postgres now (fast shutdown: sessions are cut). With
    /// `then_rewind`, the data directory is rewound before it starts again.
    Stop { then_rewind: bool },
    /// Create physical replication slots for these members.
    CreateSlots { names: Vec<String> },
    /// Drop these slots: their members have been gone longer than the grace period.
    DropSlots { names: Vec<String> },
    /// Planned handover: checkpoint, then stop Postgres so that every
    /// replica receives all WAL up to the shutdown checkpoint.
    HandoverStop { to: String },
    /// Delete the `switchover` key (done, aborted or stale).
    ClearSwitchover,
    /// Make Postgres wait for these standbys (`synchronous_standby_names`,
    /// reload). When it fails, the rest of the pass is skipped.
    SetSyncStandbys { set: super::state::SyncSet },
    /// Write our claim to the `sync` key (compare: we hold the leader key).
    /// When it fails, the rest of the pass is skipped.
    PublishSync { set: super::state::SyncSet },
    /// Delete the `sync` key (synchronous mode is off).
    DeleteSync,
    /// A condition the agent must not act on: log it, publish it, exit non-zero.
    Refuse { problem: String },
    /// Nothing to do yet: the step's reason says what we wait for and
    /// until when. Logged every pass, so no wait is silent.
    Wait,
}

/// An action and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub reason: String,
}

impl Step {
    pub fn new(action: Action, reason: impl Into<String>) -> Step {
        Step {
            action,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::ClaimInitialize { .. } => f.write_str("claim_initialize"),
            Action::InitDb => f.write_str("initdb"),
            Action::PublishSystemIdentifier { .. } => f.write_str("publish_system_identifier"),
            Action::Clone { from } => write!(f, "clone from {from}"),
            Action::Rewind { from } => write!(f, "rewind from {from}"),
            Action::MoveAside => f.write_str("move data directory aside"),
            Action::StartPrimary => f.write_str("start primary"),
            Action::StartReplica { upstream: Some(u) } => write!(f, "start replica of {u}"),
            Action::StartReplica { upstream: None } => f.write_str("start replica"),
            Action::Follow { upstream } => write!(f, "follow {upstream}"),
            Action::AcquireLeader => f.write_str("acquire leader key"),
            Action::RenewLeader { .. } => f.write_str("renew leader lease"),
            Action::ReleaseLeader => f.write_str("release leader key"),
            Action::HandOverKey { to } => write!(f, "hand leader key over to {to}"),
            Action::ReserveTimeline { timeline } => write!(f, "reserve timeline {timeline}"),
            Action::Promote { timeline } => write!(f, "promote to timeline {timeline}"),
            Action::Stop { then_rewind: false } => f.write_str("stop postgres"),
            Action::Stop { then_rewind: true } => f.write_str("stop postgres for rewind"),
            Action::CreateSlots { names } => write!(f, "create slots {}", names.join(",")),
            Action::DropSlots { names } => write!(f, "drop slots {}", names.join(",")),
            Action::HandoverStop { to } => write!(f, "stop for handover to {to}"),
            Action::ClearSwitchover => f.write_str("clear switchover"),
            Action::SetSyncStandbys { set } => write!(f, "wait for standbys {set}"),
            Action::PublishSync { set } => write!(f, "publish sync {set}"),
            Action::DeleteSync => f.write_str("delete sync key"),
            Action::Refuse { .. } => f.write_str("refuse"),
            Action::Wait => f.write_str("wait"),
        }
    }
}
