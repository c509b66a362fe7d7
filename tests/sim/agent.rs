//! The agent glue, simulated: what `src/agent.rs` does around `ha::decide`
//! (observe, execute each step, feed the fence guard, publish), with etcd
//! calls as messages that arrive, get lost or time out, and Postgres jobs
//! that take time. The decisions are the real `pgha::ha::decide`.

use std::collections::BTreeMap;

use pgha::config::Tags;
use pgha::ha::{
    self, Action, DataDir as DirKind, DcsView, Handover, HeldLease, Job, JobError, LocalPostgres,
    MemberRole, MemberStatus, Memory, Observation, PeerPosition, PgRole, Replication, Step,
    SyncApplied, SyncKey, Tick, TimelineKey,
};

use crate::etcd::{self, Value};
use crate::postgres::lsn;
use crate::world::{Ev, Op, Res, World, BALANCER_WINDOW_MS, EPOCH_MS, SYSTEM_IDENTIFIER};

#[derive(Debug, Clone)]
pub enum Work {
    Start { primary: bool },
    Stop { checkpoint_first: bool },
    Rewind { from: String },
    Clone { from: String },
}

#[derive(Debug, Clone)]
pub struct RunningJob {
    pub kind: Job,
    pub id: u64,
    pub work: Work,
    /// Simulated time the job began.
    pub started: u64,
    pub result: Option<Result<(), JobError>>,
}

#[derive(Debug)]
pub struct Pass {
    obs: Observation,
    steps: Vec<Step>,
    idx: usize,
    /// Sub-step of a step made of several etcd calls.
    stage: u8,
    tmp: i64,
    sent_at: Tick,
}

#[derive(Debug, Default)]
pub enum Phase {
    #[default]
    Idle,
    Loading {
        local: Box<LocalPostgres>,
    },
    Stepping(Box<Pass>),
    Publishing(Box<Pass>, u8),
}

/// The agent's own state (the fields of `agent::Agent` decide depends on).
#[derive(Debug, Default)]
pub struct Agent {
    pub epoch: u64,
    pub leader_lease: Option<HeldLease>,
    pub member_lease: Option<i64>,
    pub job: Option<RunningJob>,
    /// The same HA memory the agent keeps (`ha::Memory`).
    pub memory: Memory,
    /// What this node's router follows (`ha::route`, as the agent publishes).
    pub route: ha::RouteChoice,
    /// Local time the current (or last) pass began: its own duration
    /// counts toward loop_wait, as in the agent.
    pub pass_started: Tick,
    /// The lease keeper's (`src/lease.rs`): renewals go out until then
    /// (local clock), with their lease and send time by request.
    pub renew_until: Option<Tick>,
    pub keeper_rpcs: BTreeMap<u64, (i64, Tick)>,
    pub keeper_gen: u64,
    pub phase: Phase,
    pub awaiting: Option<u64>,
    pub wake_gen: u64,
    pub wake_pending: bool,
}

/// What a step does once its etcd calls are done, or that it waits.
enum Flow {
    Next,
    Wait,
}

fn tags() -> Tags {
    Tags {
        failover_priority: 1,
        ..Tags::default()
    }
}

impl World {
    pub fn schedule_wake(&mut self, i: usize, after_local_ms: u64) {
        let at = self
            .true_time(i, self.local_now(i).plus_ms(after_local_ms))
            .max(self.now);
        if self.cfg.knobs.trace_decisions {
            let (n, now) = (self.nodes[i].name.clone(), self.now);
            self.log(|| format!("{n}: next wake at {at} (now {now})"));
        }
        let a = &mut self.nodes[i].agent;
        a.wake_gen += 1;
        let ev = Ev::Wake {
            node: i,
            epoch: a.epoch,
            gen: a.wake_gen,
        };
        self.push_at(at, ev);
    }

    /// The etcd watch or a finished job wakes the loop.
    pub fn agent_poke(&mut self, i: usize) {
        if matches!(self.nodes[i].agent.phase, Phase::Idle) {
            self.schedule_wake(i, 0);
        } else {
            self.nodes[i].agent.wake_pending = true;
        }
    }

    fn await_rpc(&mut self, i: usize, op: Op) {
        let rpc = self.send(i, op, true);
        self.nodes[i].agent.awaiting = Some(rpc);
    }

    pub fn agent_wake(&mut self, i: usize) {
        if !matches!(self.nodes[i].agent.phase, Phase::Idle) {
            self.nodes[i].agent.wake_pending = true;
            return;
        }
        self.reap_job(i);
        if self.nodes[i].pg.exited {
            self.nodes[i].pg.exited = false;
            self.nodes[i].agent.memory.postgres_exited();
        }
        let busy_dir = self.nodes[i]
            .agent
            .job
            .as_ref()
            .is_some_and(|j| matches!(j.kind, Job::InitDb | Job::Clone | Job::Rewind));
        let local = if busy_dir {
            LocalPostgres::default()
        } else {
            self.probe(i)
        };
        let started = self.local_now(i);
        let a = &mut self.nodes[i].agent;
        a.pass_started = started;
        a.phase = Phase::Loading {
            local: Box::new(local),
        };
        self.await_rpc(i, Op::Load);
    }

    fn reap_job(&mut self, i: usize) {
        let a = &mut self.nodes[i].agent;
        let done = a.job.as_ref().is_some_and(|j| j.result.is_some());
        if !done {
            return;
        }
        let job = a.job.take().expect("checked");
        let mut result = job.result.expect("checked");
        if let Err(e) = &result {
            let name = self.nodes[i].name.clone();
            self.log(|| format!("{name}: job {:?} failed: {e}", job.kind));
            if self.cfg.knobs.unreachable_rewind_fails {
                // Planted bug: a rewind that changed nothing counts as failed.
                result = Err(JobError::Failed(e.to_string()));
            }
        }
        self.nodes[i]
            .agent
            .memory
            .job_finished(job.kind, result.as_ref().map(|_| ()));
    }

    /// What the agent's SQL probe returns.
    fn probe(&self, i: usize) -> LocalPostgres {
        let pg = &self.nodes[i].pg;
        if !pg.running || pg.stopping {
            return LocalPostgres::default();
        }
        let dir = pg.dir.as_ref().expect("running");
        let pos = lsn(dir.wal.len());
        let me = &self.nodes[i].name;
        match pg.role {
            Some(PgRole::Primary) => LocalPostgres {
                running: true,
                role: Some(PgRole::Primary),
                timeline: Some(dir.timeline),
                wal_position: Some(pos),
                slots: pg.slots.clone(),
                sync_standbys: Some(dir.sync_conf.clone()),
                replication: (0..self.nodes.len())
                    .filter(|&j| {
                        j != i && self.nodes[j].pg.streaming_from.as_deref() == Some(me.as_str())
                    })
                    .map(|j| Replication {
                        name: self.nodes[j].name.clone(),
                        state: "streaming".into(),
                        flush_lsn: lsn(self.nodes[j].pg.len()),
                    })
                    .collect(),
                ..LocalPostgres::default()
            },
            _ => LocalPostgres {
                running: true,
                role: Some(PgRole::Replica),
                timeline: Some(dir.timeline),
                wal_position: Some(pos),
                receive_lsn: Some(pos),
                replay_lsn: Some(pos),
                streaming_from: pg.streaming_from.clone(),
                sync_standbys: Some(dir.sync_conf.clone()),
                ..LocalPostgres::default()
            },
        }
    }

    pub fn agent_reply(&mut self, i: usize, res: Option<Res>) {
        let phase = std::mem::take(&mut self.nodes[i].agent.phase);
        match phase {
            Phase::Idle => {}
            Phase::Loading { local } => {
                let obs = self.observe(i, *local, res);
                let route = ha::route(
                    &obs,
                    &self.nodes[i].agent.memory,
                    self.settings.fence_window_ms(),
                );
                let a = &mut self.nodes[i].agent;
                if !(self.cfg.knobs.frozen_route && a.route.primary.is_some()) {
                    a.route = route;
                }
                let now = self.local_now(i);
                let mut steps = ha::decide(&obs, &self.settings, now);
                if self.cfg.knobs.no_start_repoint && obs.job.is_some() {
                    steps.retain(|s| !matches!(s.action, Action::Follow { .. }));
                }
                self.stats.decides += 1;
                if self.cfg.knobs.trace && self.cfg.knobs.trace_decisions {
                    let (name, st) = (obs.node.clone(), steps.len());
                    let (l, d) = (
                        format!("{:?}", obs.local.role),
                        obs.dcs.as_ref().map(|d| {
                            (
                                d.leader.as_ref().map(|l| l.name.clone()),
                                d.switchover.clone(),
                                d.sync.clone(),
                            )
                        }),
                    );
                    self.log(|| format!("{name}: decide: {st} steps; role {l} running {} job {:?} dcs {d:?} peers {:?}", obs.local.running, obs.job, obs.peers));
                }
                let pass = Box::new(Pass {
                    obs,
                    steps,
                    idx: 0,
                    stage: 0,
                    tmp: 0,
                    sent_at: now,
                });
                self.run_steps(i, pass, None);
            }
            Phase::Stepping(pass) => self.run_steps(i, pass, Some(res)),
            Phase::Publishing(pass, stage) => self.publish(i, pass, stage + 1, res),
        }
    }

    fn observe(&mut self, i: usize, local: LocalPostgres, res: Option<Res>) -> Observation {
        let now = self.local_now(i);
        let name = self.nodes[i].name.clone();
        let dcs = match res {
            Some(Res::View(v)) => Some(*v),
            _ => None,
        };
        let job_kind = self.nodes[i].agent.job.as_ref().map(|j| j.kind);
        let (data_dir, last_role, checkpoint_lsn) = match &self.nodes[i].pg.dir {
            None => (DirKind::Empty, None, None),
            Some(d) => {
                let stopped = !local.running && job_kind.is_none();
                (
                    DirKind::Initialized {
                        system_identifier: SYSTEM_IDENTIFIER,
                    },
                    stopped.then_some(if d.standby {
                        PgRole::Replica
                    } else {
                        PgRole::Primary
                    }),
                    // pgha reads it only after a clean shutdown.
                    (stopped && d.shut_down).then_some(lsn(d.checkpoint)),
                )
            }
        };
        let mut local = local;
        let a = &mut self.nodes[i].agent;
        a.memory.local_seen(&mut local, now);
        a.memory.stopped_dir_seen(last_role, now);
        if let (Some(view), Some(lease)) = (&dcs, a.leader_lease) {
            if !ha::lease_still_ours(view, &name, lease.lease_id) {
                a.leader_lease = None;
            }
        }
        let orphan_slots = a
            .memory
            .dcs_seen(dcs.as_ref(), a.pass_started, &name, &local, now);
        let leaderless_replica = ha::leaderless_replica(&local, dcs.as_ref());
        let wants_peers = a.memory.wants_peers(&local, dcs.as_ref());
        if job_kind.is_none() && !local.running {
            let marker = self.nodes[i].pg.rewind_marker && !self.cfg.knobs.ignore_rewind_marker;
            self.nodes[i].agent.memory.rewind_pending = marker;
        }
        let (mut peers, live_primary) = match (&dcs, wants_peers) {
            (Some(view), true) => {
                let (p, primary) = self.ask_peers(i, view);
                (Some(p), primary)
            }
            _ => (None, None),
        };
        let a = &self.nodes[i].agent;
        let mut dcs = dcs;
        if self.cfg.knobs.hide_lag && leaderless_replica {
            // Test knob: candidate selection blind to lag.
            peers = Some(Vec::new());
            if let Some(d) = dcs.as_mut() {
                d.sync = None;
                d.last_leader_lsn = None;
            }
        }
        Observation {
            node: name,
            tags: tags(),
            region: None,
            may_bootstrap: true,
            data_dir,
            local,
            dcs,
            leader_lease: a.leader_lease,
            job: job_kind,
            starting_standby: a
                .job
                .as_ref()
                .is_some_and(|j| matches!(j.work, Work::Start { primary: false })),
            pg_down_since: a.memory.pg_down_since,
            orphan_slots,
            last_role,
            replica_stalled_since: a.memory.stalled_since(),
            needs_rewind: a.memory.needs_rewind,
            rewind_failed: a.memory.rewind_failed,
            rewind_pending: a.memory.rewind_pending,
            member_waits: a.memory.member_waits().clone(),
            peers,
            wall_ms: EPOCH_MS + self.now,
            handover: a.memory.handover.clone(),
            checkpoint_lsn,
            shutting_down: false,
            sync_applied: a.memory.sync_applied.clone(),
            failsafe_promise_until: None,
            live_primary,
            primary_ended_at: a.memory.primary_ended_at,
        }
    }

    /// The other members' APIs, answering from their last published snapshot.
    fn ask_peers(&self, i: usize, view: &DcsView) -> (Vec<PeerPosition>, Option<String>) {
        let mut peers = Vec::new();
        let mut primary = None;
        for m in view.members.iter().filter(|m| m.name != self.nodes[i].name) {
            let Some(j) = self.index_of(&m.name) else {
                continue;
            };
            let n = &self.nodes[j];
            let answers = self.peers_connected(i, j)
                && n.agent_up
                && self.host_running(j)
                && n.paused_until <= self.now;
            let Some(s) = n.api_status.as_ref().filter(|_| answers) else {
                continue;
            };
            if s.role == MemberRole::Primary && s.state == "running" {
                primary = Some(s.name.clone());
                continue;
            }
            if self.cfg.knobs.live_api && n.pg.running && !n.pg.stopping {
                let pos = lsn(n.pg.len());
                if n.pg.role == Some(PgRole::Replica) {
                    peers.push(PeerPosition {
                        name: s.name.clone(),
                        timeline: Some(n.pg.timeline()),
                        lsn: pos,
                        replay_lsn: pos,
                        saw_no_leader: true,
                        replay_paused: false,
                    });
                }
                continue;
            }
            if s.role == MemberRole::Replica && matches!(s.state.as_str(), "running" | "streaming")
            {
                peers.push(PeerPosition {
                    name: s.name.clone(),
                    timeline: s.timeline,
                    lsn: s.receive_lsn.max(s.replay_lsn).unwrap_or_default(),
                    replay_lsn: s.replay_lsn.unwrap_or_default(),
                    saw_no_leader: n.api_saw_no_leader,
                    replay_paused: false,
                });
            }
        }
        (peers, primary)
    }

    fn run_steps(&mut self, i: usize, mut pass: Box<Pass>, mut reply: Option<Option<Res>>) {
        loop {
            if pass.idx >= pass.steps.len() {
                self.feed_guard(i);
                self.publish(i, pass, 0, None);
                return;
            }
            let step = pass.steps[pass.idx].clone();
            if reply.is_none() && pass.stage == 0 {
                let name = self.nodes[i].name.clone();
                self.log(|| format!("{name}: {} ({})", step.action, step.reason));
            }
            match self.execute(i, &step, &mut pass, reply.take()) {
                Flow::Wait => {
                    self.nodes[i].agent.phase = Phase::Stepping(pass);
                    return;
                }
                Flow::Next => {
                    self.feed_guard(i);
                    pass.idx += 1;
                    pass.stage = 0;
                    if self.pass_blocked {
                        self.pass_blocked = false;
                        pass.idx = pass.steps.len();
                    }
                }
            }
        }
    }

    fn spawn_job(&mut self, i: usize, kind: Job, work: Work) {
        self.nodes[i].pg.start_killed = false;
        self.next_job += 1;
        let id = self.next_job;
        let ms = match work {
            Work::Start { .. } => self.rng.range(300, 3_000),
            Work::Stop { .. } => self.rng.range(50, 800),
            Work::Rewind { .. } => self.rng.range(500, 4_000),
            Work::Clone { .. } => self.rng.range(1_000, 5_000),
        };
        let epoch = self.nodes[i].agent.epoch;
        let started = self.now;
        self.nodes[i].agent.job = Some(RunningJob {
            kind,
            id,
            work,
            started,
            result: None,
        });
        self.push(
            ms,
            Ev::JobDone {
                node: i,
                epoch,
                job: id,
            },
        );
    }

    /// One step. `reply`: `None` on the first call, then the answer (or
    /// timeout) of the etcd call it waits for.
    fn execute(
        &mut self,
        i: usize,
        step: &Step,
        pass: &mut Pass,
        reply: Option<Option<Res>>,
    ) -> Flow {
        let name = self.nodes[i].name.clone();
        let now = self.local_now(i);
        match &step.action {
            Action::Refuse { problem } => {
                self.fail(format!("{name} refused to run: {problem}"));
                Flow::Next
            }
            Action::ClaimInitialize { .. }
            | Action::InitDb
            | Action::PublishSystemIdentifier { .. } => {
                self.fail(format!(
                    "{name}: unexpected bootstrap step {} in a bootstrapped cluster",
                    step.action
                ));
                Flow::Next
            }
            Action::Clone { from } => {
                self.spawn_job(i, Job::Clone, Work::Clone { from: from.clone() });
                Flow::Next
            }
            Action::Rewind { from } => {
                // As `LocalPg::rewind`: the marker goes down before pg_rewind runs.
                self.nodes[i].pg.rewind_marker = true;
                self.spawn_job(i, Job::Rewind, Work::Rewind { from: from.clone() });
                Flow::Next
            }
            Action::Wait => Flow::Next,
            Action::MoveAside => {
                self.nodes[i].pg.dir = None;
                self.nodes[i].pg.rewind_marker = false;
                self.nodes[i].agent.memory.rewind_pending = false;
                let a = &mut self.nodes[i].agent;
                a.memory.rewind_failed = false;
                a.memory.needs_rewind = false;
                Flow::Next
            }
            // As the agent's executor: a lease that ran out since the
            // decision (a slow pass, a frozen host) skips the step.
            Action::StartPrimary | Action::Promote { .. }
                if !self.cfg.knobs.no_fencing && !self.lease_ahead(i) =>
            {
                self.pass_blocked = true;
                Flow::Next
            }
            Action::StartPrimary => {
                self.nodes[i].pg.upstream = None;
                self.spawn_job(i, Job::Start, Work::Start { primary: true });
                Flow::Next
            }
            Action::StartReplica { upstream } => {
                // A load balancer polling /primary would still send writers
                // to a primary that stopped less than its window ago.
                let other_leader = pass
                    .obs
                    .dcs
                    .as_ref()
                    .and_then(|d| d.leader.as_ref())
                    .is_some_and(|l| l.name != self.nodes[i].name);
                let window = BALANCER_WINDOW_MS;
                if let Some(at) = self.nodes[i].agent.memory.primary_ended_at {
                    if other_leader && now.since(at) < window {
                        let name = self.nodes[i].name.clone();
                        self.fail(format!(
                            "{name} started as a standby {} ms after it stopped as primary (balancer window {window} ms)",
                            now.since(at)
                        ));
                    }
                }
                let known = upstream.clone().filter(|u| {
                    self.nodes[i]
                        .agent
                        .memory
                        .last_view
                        .as_ref()
                        .is_some_and(|v| v.member(u).is_some())
                });
                self.nodes[i].agent.memory.following = known.clone();
                self.nodes[i].pg.upstream = known;
                self.spawn_job(i, Job::Start, Work::Start { primary: false });
                Flow::Next
            }
            Action::Follow { upstream } => {
                let known = self.nodes[i]
                    .agent
                    .memory
                    .last_view
                    .as_ref()
                    .is_some_and(|v| v.member(upstream).is_some());
                let starting = self.nodes[i].agent.job.as_ref().is_some_and(|j| {
                    matches!(j.work, Work::Start { primary: false }) && j.result.is_none()
                });
                if known && (self.nodes[i].pg.running || starting) {
                    self.nodes[i].pg.upstream = Some(upstream.clone());
                    self.nodes[i].pg.streaming_from = None;
                    self.nodes[i].agent.memory.following = Some(upstream.clone());
                }
                Flow::Next
            }
            Action::AcquireLeader => match (pass.stage, reply) {
                (0, None) => {
                    pass.sent_at = now;
                    pass.stage = 1;
                    self.await_rpc(i, Op::Grant);
                    Flow::Wait
                }
                (1, Some(Some(Res::Lease(lease)))) => {
                    pass.tmp = lease;
                    pass.stage = 2;
                    self.await_rpc(i, Op::CreateLeader { lease });
                    Flow::Wait
                }
                (2, Some(Some(Res::Bool(true)))) => {
                    if step.reason.starts_with("switchover from")
                        || step.reason.starts_with("forced failover from")
                    {
                        self.switchover_takers.push(i);
                    } else {
                        self.switchover_takers.retain(|&n| n != i);
                    }
                    let lease = pass.tmp;
                    self.keeper_hold(i, lease, pass.sent_at);
                    Flow::Next
                }
                (2, _) => {
                    let lease = pass.tmp;
                    self.abandon_lease(i, lease);
                    Flow::Next
                }
                _ => Flow::Next,
            },
            Action::RenewLeader { lease_id } => match reply {
                // As the agent: a key under a lease we revoked is not adopted.
                None if self.nodes[i]
                    .agent
                    .memory
                    .abandoned_leases
                    .contains(lease_id) =>
                {
                    self.nodes[i].agent.leader_lease = None;
                    self.pass_blocked = true;
                    Flow::Next
                }
                // The keeper holds it: renewing until the next pass is due.
                None if self.keeper_extend(i, *lease_id) => Flow::Next,
                None => {
                    pass.sent_at = now;
                    self.await_rpc(i, Op::KeepAlive { lease: *lease_id });
                    Flow::Wait
                }
                Some(Some(Res::Bool(true))) => {
                    self.keeper_hold(i, *lease_id, pass.sent_at);
                    Flow::Next
                }
                Some(Some(_)) => {
                    self.nodes[i].agent.leader_lease = None;
                    Flow::Next
                }
                Some(None) => Flow::Next,
            },
            Action::ReleaseLeader => match reply {
                None => {
                    let a = &self.nodes[i].agent;
                    let lease = a.leader_lease.map(|l| l.lease_id).or_else(|| {
                        a.memory
                            .last_view
                            .as_ref()?
                            .leader
                            .as_ref()
                            .filter(|k| k.name == name)
                            .map(|k| k.lease_id)
                    });
                    match lease {
                        Some(lease) => {
                            pass.tmp = lease;
                            self.await_rpc(i, Op::ReleaseLeader { lease });
                            Flow::Wait
                        }
                        None => {
                            self.nodes[i].agent.leader_lease = None;
                            Flow::Next
                        }
                    }
                }
                Some(_) => {
                    let lease = pass.tmp;
                    self.abandon_lease(i, lease);
                    self.nodes[i].agent.leader_lease = None;
                    Flow::Next
                }
            },
            Action::HandOverKey { to } => match reply {
                None => {
                    let a = &self.nodes[i].agent;
                    let sw = pass.obs.dcs.as_ref().and_then(|d| d.switchover.clone());
                    match (a.leader_lease.map(|l| l.lease_id), sw) {
                        (Some(lease), Some(sw)) => {
                            pass.tmp = lease;
                            self.await_rpc(
                                i,
                                Op::HandOver {
                                    lease,
                                    sw: Box::new(sw),
                                    to: to.clone(),
                                },
                            );
                            Flow::Wait
                        }
                        _ => Flow::Next,
                    }
                }
                Some(Some(Res::Bool(true))) => {
                    let lease = pass.tmp;
                    self.abandon_lease(i, lease);
                    self.nodes[i].agent.leader_lease = None;
                    Flow::Next
                }
                Some(_) => Flow::Next,
            },
            Action::ReserveTimeline { timeline } => match reply {
                None => match self.nodes[i].agent.leader_lease {
                    Some(l) => {
                        // Past the history files in pg_wal, as the agent.
                        let newest = self.nodes[i]
                            .pg
                            .dir
                            .as_ref()
                            .map_or(0, |d| d.newest_timeline);
                        let t = (*timeline).max(newest + 1);
                        self.nodes[i].agent.memory.reserved_timeline = Some(t);
                        let value = Value::Timeline(TimelineKey {
                            timeline: t,
                            by: name.clone(),
                        });
                        self.await_rpc(
                            i,
                            Op::PutIfLeader {
                                lease: l.lease_id,
                                key: etcd::TIMELINE,
                                value,
                            },
                        );
                        Flow::Wait
                    }
                    None => {
                        self.pass_blocked = true;
                        Flow::Next
                    }
                },
                Some(Some(Res::Bool(true))) => Flow::Next,
                Some(_) => {
                    self.nodes[i].agent.memory.reserved_timeline = None;
                    self.pass_blocked = true;
                    Flow::Next
                }
            },
            Action::Promote { timeline } => {
                let target = self.nodes[i]
                    .agent
                    .memory
                    .reserved_timeline
                    .take()
                    .filter(|r| r >= timeline)
                    .unwrap_or(*timeline);
                // The placeholder history files: Postgres skips every
                // number below the target (they are removed again after).
                let pg = &mut self.nodes[i].pg;
                let promotable = pg.running && !pg.stopping && pg.role == Some(PgRole::Replica);
                if let Some(dir) = pg.dir.as_mut().filter(|_| promotable) {
                    dir.newest_timeline = dir.newest_timeline.max(target - 1);
                }
                self.promote(i);
                Flow::Next
            }
            Action::Stop { then_rewind } => {
                self.nodes[i].agent.memory.stop_began(&pass.obs.local, now);
                self.nodes[i].agent.memory.following = None;
                self.nodes[i].agent.memory.needs_rewind |= *then_rewind;
                self.begin_stop(i);
                self.spawn_job(
                    i,
                    Job::Stop,
                    Work::Stop {
                        checkpoint_first: false,
                    },
                );
                Flow::Next
            }
            Action::HandoverStop { to } => {
                let force = pass
                    .obs
                    .dcs
                    .as_ref()
                    .and_then(|d| d.switchover.as_ref())
                    .is_some_and(|s| s.force);
                let a = &mut self.nodes[i].agent;
                a.memory.handover = Some(Handover {
                    since: now,
                    to: to.clone(),
                    force,
                });
                a.memory.following = None;
                a.memory.stop_began(&pass.obs.local, now);
                self.begin_stop(i);
                self.spawn_job(
                    i,
                    Job::Stop,
                    Work::Stop {
                        checkpoint_first: true,
                    },
                );
                Flow::Next
            }
            Action::SetSyncStandbys { set } => {
                let pg = &mut self.nodes[i].pg;
                if pg.running && !pg.stopping {
                    pg.dir.as_mut().expect("running").sync_conf = set.clone();
                    // Backends pick the reload up a little later, well within the settle time.
                    let d = self.rng.range(1, 300);
                    self.push(
                        d,
                        Ev::SyncEffective {
                            node: i,
                            set: set.clone(),
                        },
                    );
                    self.nodes[i].agent.memory.sync_applied = Some(SyncApplied {
                        set: set.clone(),
                        at: now,
                        mark: None,
                    });
                } else {
                    self.pass_blocked = true;
                }
                Flow::Next
            }
            Action::PublishSync { set } => match reply {
                None => match self.nodes[i].agent.leader_lease {
                    Some(l) => {
                        let value = Value::Sync(SyncKey {
                            leader: name.clone(),
                            set: set.clone(),
                        });
                        self.await_rpc(
                            i,
                            Op::PutIfLeader {
                                lease: l.lease_id,
                                key: etcd::SYNC,
                                value,
                            },
                        );
                        Flow::Wait
                    }
                    None => {
                        self.pass_blocked = true;
                        Flow::Next
                    }
                },
                Some(Some(Res::Bool(true))) => Flow::Next,
                Some(_) => {
                    self.pass_blocked = true;
                    Flow::Next
                }
            },
            Action::DeleteSync => {
                if reply.is_none() {
                    if let Some(l) = self.nodes[i].agent.leader_lease {
                        self.await_rpc(
                            i,
                            Op::DeleteIfLeader {
                                lease: l.lease_id,
                                key: etcd::SYNC,
                            },
                        );
                        return Flow::Wait;
                    }
                }
                Flow::Next
            }
            Action::ClearSwitchover => {
                if reply.is_none() {
                    self.await_rpc(
                        i,
                        Op::Delete {
                            key: etcd::SWITCHOVER,
                        },
                    );
                    return Flow::Wait;
                }
                Flow::Next
            }
            Action::CreateSlots { names } => {
                let pg = &mut self.nodes[i].pg;
                if pg.running {
                    for n in names {
                        if !pg.slots.contains(n) {
                            pg.slots.push(n.clone());
                        }
                    }
                }
                Flow::Next
            }
            Action::DropSlots { names } => {
                self.nodes[i].pg.slots.retain(|s| !names.contains(s));
                Flow::Next
            }
        }
    }

    fn begin_stop(&mut self, i: usize) {
        let pg = &mut self.nodes[i].pg;
        if pg.running {
            pg.stopping = true;
            pg.waiting.clear();
        }
    }

    fn promote(&mut self, i: usize) {
        let name = self.nodes[i].name.clone();
        let pg = &self.nodes[i].pg;
        if !pg.running || pg.stopping || pg.role != Some(PgRole::Replica) {
            self.log(|| format!("{name}: promotion failed: postgres is not a running standby"));
            return;
        }
        if self.etcd.leader_name().as_deref() != Some(name.as_str()) {
            let holder = self.etcd.leader_name();
            self.fail(format!(
                "{name} promoted while the leader key is held by {holder:?}"
            ));
            return;
        }
        self.next_record += 1;
        let record = self.next_record;
        let pg = &mut self.nodes[i].pg;
        let dir = pg.dir.as_mut().expect("running");
        let tl = dir.newest_timeline + 1;
        dir.timeline = tl;
        dir.newest_timeline = tl;
        dir.standby = false;
        // The end-of-recovery record: the new timeline's WAL diverges here.
        dir.wal.push(record);
        pg.role = Some(PgRole::Primary);
        pg.upstream = None;
        pg.streaming_from = None;
        pg.effective_sync = dir.sync_conf.clone();
        self.nodes[i].agent.memory.following = None;
        self.stats.promotions += 1;
        self.log(|| format!("{name}: PROMOTED to timeline {tl}"));
        if tl <= self.max_promoted_timeline {
            let max = self.max_promoted_timeline;
            self.fail(format!(
                "{name} promoted to timeline {tl}, not above timeline {max} already promoted"
            ));
        }
        self.max_promoted_timeline = self.max_promoted_timeline.max(tl);
    }

    pub fn job_done(&mut self, i: usize, id: u64) {
        let Some(job) = self.nodes[i]
            .agent
            .job
            .clone()
            .filter(|j| j.id == id && j.result.is_none())
        else {
            return;
        };
        let inconsistent = self.nodes[i]
            .pg
            .dir
            .as_ref()
            .is_some_and(|d| d.inconsistent);
        // Its WAL comes only from the primary that primary_conninfo names.
        let upstream = self.nodes[i].pg.upstream.clone();
        let fed = (0..self.nodes.len()).any(|j| {
            j != i
                && Some(&self.nodes[j].name) == upstream.as_ref()
                && self.writable(j)
                && self.peers_connected(i, j)
        });
        if matches!(job.work, Work::Start { primary: false }) && inconsistent && !fed {
            // A half-rewound standby waits for WAL only a primary sends:
            // still `starting`, no position.
            let epoch = self.nodes[i].agent.epoch;
            self.push(
                500,
                Ev::JobDone {
                    node: i,
                    epoch,
                    job: id,
                },
            );
            return;
        }
        let result = self.finish_work(i, &job.work);
        let name = self.nodes[i].name.clone();
        self.log(|| format!("{name}: job {:?} done: {result:?}", job.kind));
        if let Some(j) = self.nodes[i].agent.job.as_mut() {
            j.result = Some(result);
        }
        // The agent hears of it when it runs (the job_done channel).
        let epoch = self.nodes[i].agent.epoch;
        self.push(0, Ev::Watch { node: i, epoch });
    }

    pub fn finish_work(&mut self, i: usize, work: &Work) -> Result<(), JobError> {
        match work {
            Work::Start { primary } => {
                let pg = &mut self.nodes[i].pg;
                if std::mem::take(&mut pg.start_killed) {
                    return Err(JobError::Failed(
                        "postmaster stopped by the fence guard while starting".into(),
                    ));
                }
                let Some(dir) = pg.dir.as_mut() else {
                    return Err(JobError::Failed("no data directory".into()));
                };
                if pg.running {
                    return Err(JobError::Failed("already running".into()));
                }
                dir.standby = !primary;
                dir.shut_down = false;
                pg.running = true;
                pg.stopping = false;
                pg.role = Some(if *primary {
                    PgRole::Primary
                } else {
                    PgRole::Replica
                });
                pg.streaming_from = None;
                pg.effective_sync = dir.sync_conf.clone();
                if *primary {
                    pg.upstream = None;
                }
                Ok(())
            }
            Work::Stop { .. } => {
                if !self.nodes[i].pg.running {
                    return Ok(());
                }
                let me = self.nodes[i].name.clone();
                if self.nodes[i].pg.role == Some(PgRole::Primary) {
                    // The shutdown checkpoint, sent to every connected standby.
                    self.next_record += 1;
                    let record = self.next_record;
                    let dir = self.nodes[i].pg.dir.as_mut().expect("running");
                    dir.checkpoint = dir.wal.len();
                    dir.shut_down = true;
                    dir.wal.push(record);
                    let src = dir.clone();
                    for j in 0..self.nodes.len() {
                        let connected = j != i
                            && self.nodes[j].pg.streaming_from.as_deref() == Some(me.as_str())
                            && self.host_running(j)
                            && self.peers_connected(i, j);
                        if connected {
                            if let Some(d) = self.nodes[j].pg.dir.as_mut() {
                                if d.is_prefix_of(&src) {
                                    d.wal = src.wal.clone();
                                }
                            }
                        }
                    }
                } else if let Some(dir) = self.nodes[i].pg.dir.as_mut() {
                    dir.checkpoint = dir.wal.len().saturating_sub(1);
                }
                let pg = &mut self.nodes[i].pg;
                pg.running = false;
                pg.stopping = false;
                pg.role = None;
                pg.streaming_from = None;
                pg.waiting.clear();
                pg.exited = true;
                Ok(())
            }
            Work::Rewind { from } | Work::Clone { from } => {
                let Some(j) = self.index_of(from) else {
                    return Err(JobError::Failed(format!("{from} unknown")));
                };
                let reachable = self.host_running(j)
                    && self.peers_connected(i, j)
                    && self.nodes[j].pg.running
                    && !self.nodes[j].pg.stopping;
                if !reachable || self.nodes[i].pg.running {
                    // As the agent's: nothing changed, tried again.
                    return Err(JobError::Retry(format!("{from} not reachable")));
                }
                let mut src = self.nodes[j].pg.dir.clone().expect("running");
                let name = self.nodes[i].name.clone();
                if let Some((old_tl, old_newest)) = self.nodes[i]
                    .pg
                    .dir
                    .as_ref()
                    .map(|d| (d.timeline, d.newest_timeline))
                {
                    if src.timeline < old_tl && matches!(work, Work::Rewind { .. }) {
                        let b = src.timeline;
                        self.fail(format!("{name} rewound from timeline {old_tl} back to {b}"));
                    }
                    src.newest_timeline = src.newest_timeline.max(old_newest);
                }
                src.standby = true;
                src.checkpoint = src.wal.len().saturating_sub(1);
                src.inconsistent = false;
                self.nodes[i].pg.dir = Some(src);
                self.nodes[i].pg.rewind_marker = false;
                Ok(())
            }
        }
    }

    /// The member status the agent publishes (`ha::member_status`, with
    /// the simulated node's identity).
    fn member_status(&self, i: usize, obs: &Observation) -> MemberStatus {
        let identity = MemberStatus {
            name: obs.node.clone(),
            role: MemberRole::Uninitialized,
            state: String::new(),
            timeline: None,
            wal_position: None,
            receive_lsn: None,
            replay_lsn: None,
            pg_host: obs.node.clone(),
            pg_port: 5432,
            api_url: format!("http://{}:8008", obs.node),
            nofailover: false,
            noloadbalance: false,
            nosync: false,
            failover_priority: 1,
            tags: BTreeMap::new(),
            region: None,
            basebackup: None,
            pending_restart: false,
            replay_paused: false,
            router_rw: None,
            router_ro: None,
            archiver: None,
            updated_at_ms: EPOCH_MS + self.now,
            version: "sim".into(),
        };
        let job = self.nodes[i].agent.job.as_ref().map(|j| j.kind);
        ha::member_status(obs, job, identity)
    }

    /// End of a pass: member key, leader status, API snapshot, next wake.
    fn publish(&mut self, i: usize, pass: Box<Pass>, stage: u8, res: Option<Res>) {
        if stage == 0 {
            let me = self.member_status(i, &pass.obs);
            self.nodes[i].api_status = Some(me.clone());
            if let Some(view) = &pass.obs.dcs {
                self.nodes[i].api_saw_no_leader = view.leader.is_none();
            }
            if pass.obs.dcs.is_some() {
                let lease = self.nodes[i].agent.member_lease;
                self.await_rpc(
                    i,
                    Op::PutMember {
                        status: Box::new(me),
                        lease,
                    },
                );
                self.nodes[i].agent.phase = Phase::Publishing(pass, 0);
                return;
            }
        }
        if stage == 1 {
            self.nodes[i].agent.member_lease = match res {
                Some(Res::Lease(id)) => Some(id),
                Some(_) => None,
                None => self.nodes[i].agent.member_lease,
            };
            let local = &pass.obs.local;
            if let (Some(lease), Some(PgRole::Primary), Some(pos)) = (
                self.nodes[i].agent.leader_lease,
                local.role,
                local.wal_position,
            ) {
                self.await_rpc(
                    i,
                    Op::PutIfLeader {
                        lease: lease.lease_id,
                        key: etcd::STATUS,
                        value: Value::Status(pos, local.timeline),
                    },
                );
                self.nodes[i].agent.phase = Phase::Publishing(pass, 1);
                return;
            }
        }
        self.end_pass(i);
    }

    fn abandon_lease(&mut self, i: usize, lease: i64) {
        let a = &mut self.nodes[i].agent;
        if a.memory.abandoned_leases.len() >= 16 {
            a.memory.abandoned_leases.remove(0);
        }
        a.memory.abandoned_leases.push(lease);
        self.send(i, Op::Revoke { lease }, false);
    }

    /// As `LeaseKeeper::hold`: the lease is ours, renewed at `renewed_at`,
    /// and renewals go out for one window from now.
    fn keeper_hold(&mut self, i: usize, lease_id: i64, renewed_at: Tick) {
        let until = self.local_now(i).plus_ms(self.renew_window_ms());
        let a = &mut self.nodes[i].agent;
        a.leader_lease = Some(HeldLease {
            lease_id,
            renewed_at,
        });
        a.renew_until = Some(until);
        self.feed_guard(i);
        self.keeper_wake(i);
    }

    /// As `LeaseKeeper::extend`.
    fn keeper_extend(&mut self, i: usize, lease_id: i64) -> bool {
        let now = self.local_now(i);
        let until = now.plus_ms(self.renew_window_ms());
        let a = &mut self.nodes[i].agent;
        if a.leader_lease.is_none_or(|l| l.lease_id != lease_id) {
            return false;
        }
        let lapsed = a.renew_until.is_none_or(|u| u <= now);
        a.renew_until = Some(a.renew_until.map_or(until, |u| u.max(until)));
        if lapsed {
            self.keeper_wake(i);
        }
        true
    }

    fn renew_window_ms(&self) -> u64 {
        self.cfg.loop_wait_ms + 2 * self.cfg.retry_timeout_ms
    }

    /// The keeper looks now (its notify), its old tick superseded.
    fn keeper_wake(&mut self, i: usize) {
        self.nodes[i].agent.keeper_gen += 1;
        self.keeper_tick_at(i, self.now);
    }

    fn keeper_tick_at(&mut self, i: usize, at: u64) {
        let a = &self.nodes[i].agent;
        let ev = Ev::KeeperTick {
            node: i,
            epoch: a.epoch,
            gen: a.keeper_gen,
        };
        self.push_at(at, ev);
    }

    /// As the keeper's loop: a keepalive every period while renewals are
    /// wanted and fewer than four are in flight; its answer may come back
    /// after later ones, or not at all.
    pub fn keeper_tick(&mut self, i: usize) {
        let now = self.local_now(i);
        let a = &self.nodes[i].agent;
        let Some(lease) = a.leader_lease else {
            return; // idle until a lease is held again
        };
        let wanted = a.renew_until.is_some_and(|u| now < u);
        if wanted && a.keeper_rpcs.len() < 4 {
            let timeout = self.settings.fence_window_ms();
            let rpc = self.send_within(
                i,
                Op::KeepAlive {
                    lease: lease.lease_id,
                },
                Some(timeout),
            );
            self.nodes[i]
                .agent
                .keeper_rpcs
                .insert(rpc, (lease.lease_id, now));
        }
        let period = pgha::lease::renew_period(
            std::time::Duration::from_millis(self.settings.fence_window_ms()),
            std::time::Duration::from_millis(self.cfg.loop_wait_ms),
        )
        .as_millis() as u64;
        let at = self.true_time(i, now.plus_ms(period)).max(self.now);
        self.keeper_tick_at(i, at);
    }

    /// A keepalive of the keeper answered (or timed out: `None`).
    pub fn keeper_reply(&mut self, i: usize, lease_id: i64, sent_at: Tick, res: Option<Res>) {
        let a = &mut self.nodes[i].agent;
        let Some(held) = a.leader_lease.filter(|l| l.lease_id == lease_id) else {
            return;
        };
        match res {
            Some(Res::Bool(true)) if sent_at > held.renewed_at => {
                a.leader_lease = Some(HeldLease {
                    lease_id,
                    renewed_at: sent_at,
                });
                self.feed_guard(i);
            }
            Some(Res::Bool(false)) => {
                a.leader_lease = None;
                a.renew_until = None;
                self.feed_guard(i);
            }
            _ => {}
        }
    }

    fn end_pass(&mut self, i: usize) {
        let a = &mut self.nodes[i].agent;
        a.phase = Phase::Idle;
        if std::mem::take(&mut a.wake_pending) {
            self.schedule_wake(i, 0);
            return;
        }
        let a = &self.nodes[i].agent;
        let base = self.cfg.loop_wait_ms;
        let wait = if a
            .memory
            .last_view
            .as_ref()
            .is_some_and(|v| v.switchover.is_some())
            || a.memory.handover.is_some()
        {
            base.min(100)
        } else if a.memory.etcd_failures == 0 || a.leader_lease.is_some() {
            base
        } else {
            let factor = 1u64 << a.memory.etcd_failures.saturating_sub(1).min(4);
            (base * factor).min(8_000.max(base))
        };
        let spent = self.local_now(i).since(a.pass_started);
        self.schedule_wake(i, wait.saturating_sub(spent));
    }
}
