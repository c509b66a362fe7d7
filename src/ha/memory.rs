//! What the HA core remembers between passes, and how each observation
//! updates it. The agent and the simulator hold one `Memory` each and feed
//! it the same way (`local_seen`, `dcs_seen`, `job_finished`), so the rules
//! that turn raw readings into an `Observation` are written once, here,
//! without I/O or clock reads (`now` is passed in).

use std::collections::BTreeMap;

use super::state::*;

/// After `synchronous_standby_names` is reloaded, how long until every
/// backend and WAL sender has re-read it: commits from the first position
/// probed after that waited for the new set.
pub const SYNC_SETTLE_MS: u64 = 1_000;

/// HA memory kept across passes.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// The local Postgres was last seen running before this instant.
    pub pg_down_since: Option<Tick>,
    /// The member `primary_conninfo` names, as we last wrote it.
    pub following: Option<String>,
    orphan_since: BTreeMap<String, Tick>,
    /// The last etcd view read.
    pub last_view: Option<DcsView>,
    /// When the read behind `last_view` was sent.
    pub last_view_at: Tick,
    /// etcd reads failed in a row.
    pub etcd_failures: u32,
    stalled_since: Option<Tick>,
    pub needs_rewind: bool,
    pub rewind_failed: bool,
    /// The rewind marker beside the data directory (read while no job runs).
    pub rewind_pending: bool,
    member_waits: MemberWaits,
    /// The last member other than us seen holding the leader key.
    pub last_known_leader: Option<String>,
    pub handover: Option<Handover>,
    replica_timeline: Option<u32>,
    pub sync_applied: Option<SyncApplied>,
    /// Timeline the last ReserveTimeline recorded, for the Promote after it.
    pub reserved_timeline: Option<u32>,
    /// Leader leases whose revocation we sent, newest last.
    pub abandoned_leases: Vec<i64>,
    /// When our Postgres last stopped being a primary that health checks
    /// call one (see `Observation::primary_ended_at`): a Stop we began, a
    /// crash we saw, or an agent start on a stopped primary's data directory.
    pub primary_ended_at: Option<Tick>,
    /// The last pass that saw our Postgres run as primary.
    primary_seen_at: Option<Tick>,
    /// A pass of this agent has seen a stopped data directory.
    stopped_dir_seen: bool,
}

impl Memory {
    /// Completes the probe of the local Postgres with what only memory
    /// knows, and remembers what the probe showed.
    pub fn local_seen(&mut self, local: &mut LocalPostgres, now: Tick) {
        if let Some(applied) = self.sync_applied.as_mut() {
            if applied.mark.is_none()
                && local.role == Some(PgRole::Primary)
                && now.since(applied.at) >= SYNC_SETTLE_MS
            {
                applied.mark = local.wal_position;
            }
        }
        if local.running {
            self.pg_down_since = None;
        } else {
            self.pg_down_since.get_or_insert(now);
        }
        if local.running && local.role == Some(PgRole::Primary) {
            self.primary_seen_at = Some(now);
        } else if let Some(seen) = self.primary_seen_at.take() {
            // It crashed or was demoted since: unless a Stop of ours
            // already started the window, it starts now.
            if self.primary_ended_at.is_none_or(|t| t < seen) {
                self.primary_ended_at = Some(now);
            }
        }
        local.following = self.following.clone();
        // A standby's timeline comes from its WAL receiver while it streams,
        // else from its last restartpoint, which lags: keep the highest seen.
        if local.role == Some(PgRole::Replica) {
            local.timeline = local.timeline.max(self.replica_timeline);
            self.replica_timeline = local.timeline;
        } else if local.running {
            self.replica_timeline = None;
        }
        let stalled = local.running
            && local.role == Some(PgRole::Replica)
            && local.following.is_some()
            && local.streaming_from.is_none();
        self.stalled_since = if stalled {
            Some(self.stalled_since.unwrap_or(now))
        } else {
            None
        };
    }

    /// We begin to stop our Postgres (its health checks turn 503 now): if it
    /// runs as primary, load balancers need the balancer window to notice.
    pub fn stop_began(&mut self, local: &LocalPostgres, now: Tick) {
        if local.running && local.role == Some(PgRole::Primary) {
            self.primary_ended_at = Some(now);
        }
    }

    /// The stopped data directory last ran as `last_role` (`None` while
    /// Postgres runs or a job works on it: nothing to learn). On the first
    /// such pass of this agent a primary's may have taken writers until
    /// just before (an agent restarted at once), and load balancers may
    /// still count it as one: the balancer window starts now.
    pub fn stopped_dir_seen(&mut self, last_role: Option<PgRole>, now: Tick) {
        let Some(role) = last_role else {
            return;
        };
        if !std::mem::replace(&mut self.stopped_dir_seen, true) && role == PgRole::Primary {
            self.primary_ended_at.get_or_insert(now);
        }
    }

    /// One etcd read sent at `sent` (`None`: it failed). Returns the
    /// replication slots on our primary that no member wants, with since when.
    pub fn dcs_seen(
        &mut self,
        dcs: Option<&DcsView>,
        sent: Tick,
        me: &str,
        local: &LocalPostgres,
        now: Tick,
    ) -> Vec<OrphanSlot> {
        let Some(view) = dcs else {
            self.etcd_failures += 1;
            return Vec::new();
        };
        self.etcd_failures = 0;
        let mut orphans = Vec::new();
        if local.role == Some(PgRole::Primary) {
            let wanted: Vec<String> = view
                .members
                .iter()
                .map(|m| super::slot_name(&m.name))
                .collect();
            self.orphan_since
                .retain(|s, _| local.slots.contains(s) && !wanted.contains(s));
            for slot in local.slots.iter().filter(|s| !wanted.contains(s)) {
                let since = *self.orphan_since.entry(slot.clone()).or_insert(now);
                orphans.push(OrphanSlot {
                    name: slot.clone(),
                    missing_since: since,
                });
            }
        }
        if let Some(leader) = view.leader.as_ref().filter(|l| l.name != me) {
            self.last_known_leader = Some(leader.name.clone());
        }
        self.member_waits.observe(view, now);
        self.last_view = Some(view.clone());
        self.last_view_at = sent;
        orphans
    }

    /// Whether this pass asks the other members' APIs for their positions:
    /// a running replica without a leader (to choose a candidate), or a
    /// leader that stopped to hand over (to confirm its target).
    pub fn wants_peers(&self, local: &LocalPostgres, dcs: Option<&DcsView>) -> bool {
        leaderless_replica(local, dcs) || (self.handover.is_some() && !local.running)
    }

    /// A background job ended.
    pub fn job_finished(&mut self, kind: Job, result: Result<(), &JobError>) {
        match result {
            Ok(()) => {
                if kind == Job::Rewind {
                    self.needs_rewind = false;
                    self.rewind_failed = false;
                    self.rewind_pending = false;
                }
                if kind == Job::Start {
                    // Running again (as replica of the new leader, or as
                    // primary after an aborted handover): the handover is over.
                    self.handover = None;
                }
            }
            // Nothing changed: the next pass decides again.
            Err(JobError::Retry(_)) => {}
            Err(JobError::Failed(_)) => {
                if kind == Job::Rewind {
                    self.rewind_failed = true;
                }
            }
        }
        if matches!(kind, Job::Rewind | Job::Clone) {
            self.replica_timeline = None;
        }
    }

    /// Our postmaster exited: it follows nobody any more.
    pub fn postgres_exited(&mut self) {
        self.following = None;
    }

    /// The memory's share of an observation.
    pub fn stalled_since(&self) -> Option<Tick> {
        self.stalled_since
    }

    pub fn member_waits(&self) -> &MemberWaits {
        &self.member_waits
    }
}

/// A running replica that sees no leader in an initialized cluster.
pub fn leaderless_replica(local: &LocalPostgres, dcs: Option<&DcsView>) -> bool {
    local.running
        && local.role == Some(PgRole::Replica)
        && dcs.is_some_and(|d| d.leader.is_none() && d.initialize.is_some())
}

/// Whether the leader key in `view` is still `me`'s under `lease_id`: the
/// lease we renew must be the one the key is bound to.
pub fn lease_still_ours(view: &DcsView, me: &str, lease_id: i64) -> bool {
    view.leader
        .as_ref()
        .is_some_and(|k| k.is_held_by(me, lease_id))
}

/// The status this member publishes at the end of a pass: `identity`
/// (name, addresses, tags, version) with the role and state the
/// observation shows, and `job`, the job running now (one this pass
/// started is published at once).
pub fn member_status(obs: &Observation, job: Option<Job>, identity: MemberStatus) -> MemberStatus {
    let local = &obs.local;
    let role = match (local.role, obs.last_role, obs.data_dir) {
        (Some(PgRole::Primary), ..) => MemberRole::Primary,
        (Some(PgRole::Replica), ..) => MemberRole::Replica,
        (None, Some(PgRole::Primary), _) => MemberRole::Primary,
        (None, _, DataDir::Initialized { .. }) => MemberRole::Replica,
        _ => MemberRole::Uninitialized,
    };
    let state = match job {
        Some(Job::InitDb) => "initializing",
        Some(Job::Clone) => "cloning",
        Some(Job::Rewind) => "rewinding",
        Some(Job::Start) => "starting",
        Some(Job::Stop) => "stopping",
        None if !local.running && obs.rewind_pending => "rewind_pending",
        None if local.running
            && local.role == Some(PgRole::Replica)
            && local.streaming_from.is_some() =>
        {
            "streaming"
        }
        None if local.running => "running",
        None => "stopped",
    };
    MemberStatus {
        role,
        state: state.into(),
        timeline: local.timeline,
        wal_position: local.wal_position,
        receive_lsn: local.receive_lsn,
        replay_lsn: local.replay_lsn,
        basebackup: if state == "cloning" {
            identity.basebackup
        } else {
            None
        },
        pending_restart: local.pending_restart,
        replay_paused: local.replay_paused,
        archiver: local.archiver.clone(),
        ..identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(streaming: bool) -> LocalPostgres {
        LocalPostgres {
            running: true,
            role: Some(PgRole::Replica),
            timeline: Some(3),
            streaming_from: streaming.then(|| "n1:5432".into()),
            ..LocalPostgres::default()
        }
    }

    #[test]
    fn a_replica_keeps_the_highest_timeline_seen_and_a_stall_keeps_its_start() {
        let mut m = Memory {
            following: Some("n1".into()),
            ..Memory::default()
        };
        let mut l = replica(false);
        m.local_seen(&mut l, Tick(100));
        assert_eq!(l.following.as_deref(), Some("n1"));
        assert_eq!(m.stalled_since(), Some(Tick(100)));
        // The restartpoint lags: timeline 2 probed, 3 kept.
        let mut l = LocalPostgres {
            timeline: Some(2),
            ..replica(false)
        };
        m.local_seen(&mut l, Tick(900));
        assert_eq!(l.timeline, Some(3));
        assert_eq!(m.stalled_since(), Some(Tick(100)));
        let mut l = replica(true);
        m.local_seen(&mut l, Tick(1000));
        assert_eq!(m.stalled_since(), None);
        assert_eq!(m.pg_down_since, None);
        let mut down = LocalPostgres::default();
        m.local_seen(&mut down, Tick(2000));
        m.local_seen(&mut down, Tick(3000));
        assert_eq!(m.pg_down_since, Some(Tick(2000)));
        m.job_finished(Job::Rewind, Ok(()));
        let mut l = LocalPostgres {
            timeline: Some(2),
            ..replica(true)
        };
        m.local_seen(&mut l, Tick(4000));
        assert_eq!(l.timeline, Some(2), "a rewind forgets the old timeline");
    }

    #[test]
    fn the_balancer_window_starts_when_a_primary_stops_crashes_or_is_found_stopped() {
        let primary = || LocalPostgres {
            running: true,
            role: Some(PgRole::Primary),
            ..LocalPostgres::default()
        };
        let mut m = Memory::default();
        m.local_seen(&mut primary(), Tick(100));
        m.local_seen(&mut LocalPostgres::default(), Tick(1_000));
        assert_eq!(m.primary_ended_at, Some(Tick(1_000)), "a crash, seen");
        // A Stop we began (its 503 came first) keeps its earlier start.
        m.local_seen(&mut primary(), Tick(5_000));
        m.stop_began(&LocalPostgres::default(), Tick(5_050));
        assert_eq!(
            m.primary_ended_at,
            Some(Tick(1_000)),
            "no primary ran: nothing ends"
        );
        m.stop_began(&primary(), Tick(5_100));
        m.local_seen(&mut LocalPostgres::default(), Tick(5_600));
        assert_eq!(m.primary_ended_at, Some(Tick(5_100)));
        // A new agent on a stopped primary's directory: from its first look.
        let mut fresh = Memory::default();
        fresh.stopped_dir_seen(None, Tick(3));
        fresh.stopped_dir_seen(Some(PgRole::Primary), Tick(7));
        fresh.stopped_dir_seen(Some(PgRole::Primary), Tick(9_000));
        assert_eq!(fresh.primary_ended_at, Some(Tick(7)));
        let mut standby = Memory::default();
        standby.stopped_dir_seen(Some(PgRole::Replica), Tick(7));
        standby.stopped_dir_seen(Some(PgRole::Primary), Tick(9_000));
        assert_eq!(standby.primary_ended_at, None, "only the first look counts");
    }

    #[test]
    fn a_rewind_that_changed_nothing_is_not_a_failed_rewind() {
        let mut m = Memory {
            needs_rewind: true,
            ..Memory::default()
        };
        m.job_finished(Job::Rewind, Err(&JobError::Retry("refused".into())));
        assert!(!m.rewind_failed);
        assert!(m.needs_rewind);
        m.job_finished(
            Job::Rewind,
            Err(&JobError::Failed("no common ancestor".into())),
        );
        assert!(m.rewind_failed);
        m.rewind_pending = true;
        m.job_finished(Job::Rewind, Ok(()));
        assert!(!m.rewind_failed && !m.needs_rewind && !m.rewind_pending);
    }

    #[test]
    fn etcd_failures_count_in_a_row_and_the_last_view_stays() {
        let mut m = Memory::default();
        let local = LocalPostgres::default();
        assert!(m.dcs_seen(None, Tick(0), "n1", &local, Tick(0)).is_empty());
        assert!(m.dcs_seen(None, Tick(1), "n1", &local, Tick(1)).is_empty());
        assert_eq!(m.etcd_failures, 2);
        let view = DcsView::default();
        m.dcs_seen(Some(&view), Tick(2), "n1", &local, Tick(2));
        assert_eq!(m.etcd_failures, 0);
        assert!(m.last_view.is_some());
        m.dcs_seen(None, Tick(3), "n1", &local, Tick(3));
        assert!(m.last_view.is_some(), "a failed read keeps the last view");
    }
}
