//! The simulated world: nodes (agent glue + Postgres + host), etcd, the
//! network, clocks and faults, driven by one event queue in simulated
//! milliseconds. Everything random comes from the schedule's seed. After
//! every event the safety properties are checked.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use pgha::ha::{
    DcsView, DynamicConfig, InitializeKey, MemberStatus, PgRole, Settings, SwitchoverKey, SyncMode,
    SyncSet, Tick,
};

use crate::agent::Agent;
use crate::etcd::{self, Etcd, Value};
use crate::postgres::{lsn, DataDir, Pg};
use crate::rng::Rng;

/// Wall clock at simulated time 0 (only scheduled switchovers read it).
pub const EPOCH_MS: u64 = 1_700_000_000_000;
pub const SYSTEM_IDENTIFIER: u64 = 7_300_000_000_000_000_042;

/// Knobs a test or the command line sets on top of what the seed chooses.
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    /// Disable fencing: no fence guard, and `decide` sees a fencing
    /// deadline that never comes (a huge TTL in the settings it is given).
    pub no_fencing: bool,
    /// Candidate selection ignores lag: a leaderless replica is shown no
    /// peer positions, no last leader position and no sync claim.
    pub hide_lag: bool,
    /// Force this synchronous mode instead of the seed's choice.
    pub sync_mode: Option<SyncMode>,
    /// Members' APIs answer candidates with live WAL positions instead of
    /// their last published snapshot (what a fix of the stale-snapshot
    /// finding would do).
    pub live_api: bool,
    /// Planted bug: the election waits for a `starting` member for good
    /// (primary_start_timeout out of reach).
    pub unbounded_start_wait: bool,
    /// Planted bug: the agent does not read its rewind marker, so a
    /// half-rewound directory is started (and stays `starting`).
    pub ignore_rewind_marker: bool,
    /// Planted bug: a standby whose start still waits is not pointed at a
    /// leader that came up meanwhile (`Follow` steps during a job dropped).
    pub no_start_repoint: bool,
    /// Planted bug: a rewind whose source is not reachable counts as a
    /// failed pg_rewind (the member then stays down for good).
    pub unreachable_rewind_fails: bool,
    /// Planted bug: a router keeps the first primary it routed to.
    pub frozen_route: bool,
    /// Planted bug: a stopped primary starts as a standby at once, while a
    /// load balancer polling /primary may still send it writers.
    pub no_balancer_hold: bool,
    /// Every fault of the schedule is of this kind.
    pub only_fault: Option<FaultKind>,
    pub trace: bool,
    /// Trace every decision (also those with no step) with its inputs.
    pub trace_decisions: bool,
}

/// Everything the seed decides about the cluster.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: usize,
    pub ttl_ms: u64,
    pub loop_wait_ms: u64,
    pub retry_timeout_ms: u64,
    pub sync_mode: SyncMode,
    pub sync_count: u32,
    /// Clock rates differ from etcd's by at most this (parts per million).
    pub max_drift_ppm: u64,
    pub loss_permille: u64,
    /// After the last fault heals a writable primary must exist within `ttl + liveness_bound_ms`.
    pub liveness_bound_ms: u64,
    pub knobs: Knobs,
}

/// The load balancers' window the checker holds every stopped primary to
/// (the agent's default `api.balancer_window`).
pub const BALANCER_WINDOW_MS: u64 = 2_500;

impl SimConfig {
    fn balancer_window_ms(&self) -> u64 {
        if self.knobs.no_balancer_hold {
            0
        } else {
            BALANCER_WINDOW_MS
        }
    }

    pub fn settings(&self) -> Settings {
        if self.knobs.no_fencing {
            return Settings {
                ttl_ms: 1 << 40,
                fencing_margin_ms: 0,
                rewind_after_ms: 5_000,
                handover_timeout_ms: 10_000,
                balancer_window_ms: self.balancer_window_ms(),
            };
        }
        // As the agent: margin = min(2 s, ttl / 3).
        Settings {
            ttl_ms: self.ttl_ms,
            fencing_margin_ms: 2_000.min(self.ttl_ms / 3),
            rewind_after_ms: 5_000,
            handover_timeout_ms: 10_000,
            balancer_window_ms: self.balancer_window_ms(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    PgCrash,
    AgentCrash,
    HostCrash,
    AgentPause,
    HostFreeze,
    EtcdCut,
    PeerCut,
    Isolate,
    ReplicationStall,
    EtcdSlow,
    Switchover,
    /// Every agent stops (a rolling deploy's SIGINT, a platform restart)
    /// while the fault's node is part way through a rewind; all start
    /// again when the fault ends.
    ClusterRestart,
}

pub const FAULT_KINDS: [FaultKind; 12] = [
    FaultKind::PgCrash,
    FaultKind::AgentCrash,
    FaultKind::HostCrash,
    FaultKind::AgentPause,
    FaultKind::HostFreeze,
    FaultKind::EtcdCut,
    FaultKind::PeerCut,
    FaultKind::Isolate,
    FaultKind::ReplicationStall,
    FaultKind::EtcdSlow,
    FaultKind::Switchover,
    FaultKind::ClusterRestart,
];

#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    pub node: usize,
    /// Second node of a `PeerCut`, target of a `Switchover` (== node: any).
    pub other: usize,
    pub at: u64,
    pub duration: u64,
}

/// One schedule: the cluster and its faults, all derived from the seed.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub seed: u64,
    pub cfg: SimConfig,
    pub faults: Vec<Fault>,
    /// Every fault has healed (and every crashed node restarted) by then.
    pub heal_at: u64,
    pub end: u64,
}

impl Schedule {
    pub fn generate(seed: u64, knobs: Knobs) -> Schedule {
        let mut rng = Rng::new(seed);
        let nodes = *rng.pick(&[3, 3, 3, 2, 4, 5]);
        let ttl_ms = *rng.pick(&[10_000, 10_000, 6_000]);
        let retry_timeout_ms = if ttl_ms >= 10_000 { 3_000 } else { 2_000 };
        let sync_mode = knobs.sync_mode.unwrap_or(*rng.pick(&[
            SyncMode::Off,
            SyncMode::On,
            SyncMode::Strict,
            SyncMode::Quorum,
        ]));
        let sync_count = if nodes >= 4 && rng.chance(500) { 2 } else { 1 };
        // Within the fencing margin's assumption (margin / ttl >= 20 %).
        let max_drift_ppm = *rng.pick(&[0, 10_000, 50_000, 100_000]);
        let loss_permille = *rng.pick(&[0, 0, 5, 20]);
        let n_faults = rng.range(1, 5) as usize;
        let mut faults = Vec::new();
        for _ in 0..n_faults {
            let kind = *rng.pick(&FAULT_KINDS);
            let kind = knobs.only_fault.unwrap_or(kind);
            let node = rng.below(nodes as u64) as usize;
            let mut other = rng.below(nodes as u64) as usize;
            if kind == FaultKind::PeerCut && other == node {
                other = (node + 1) % nodes;
            }
            let at = rng.range(2_000, 30_000);
            let duration = match kind {
                FaultKind::PgCrash | FaultKind::Switchover => 0,
                FaultKind::AgentPause | FaultKind::HostFreeze => {
                    if rng.chance(500) {
                        rng.range(100, 3_000)
                    } else {
                        rng.range(3_000, 25_000)
                    }
                }
                _ => rng.range(200, 25_000),
            };
            faults.push(Fault {
                kind,
                node,
                other,
                at,
                duration,
            });
        }
        faults.sort_by_key(|f| f.at);
        let heal_at = faults.iter().map(|f| f.at + f.duration).max().unwrap_or(0);
        let liveness_bound_ms = 20_000;
        let end = heal_at + ttl_ms + liveness_bound_ms + SETTLE_MS + 1;
        Schedule {
            seed,
            cfg: SimConfig {
                nodes,
                ttl_ms,
                loop_wait_ms: 1_000,
                retry_timeout_ms,
                sync_mode,
                sync_count,
                max_drift_ppm,
                loss_permille,
                liveness_bound_ms,
                knobs,
            },
            faults,
            heal_at,
            end,
        }
    }
}

/// After the liveness check, how long a standby's start may still wait
/// while a primary runs (a start takes at most 3 s here).
pub const SETTLE_MS: u64 = 10_000;

/// What an etcd request asks.
#[derive(Debug, Clone)]
pub enum Op {
    Load,
    Grant,
    CreateLeader {
        lease: i64,
    },
    KeepAlive {
        lease: i64,
    },
    Revoke {
        lease: i64,
    },
    ReleaseLeader {
        lease: i64,
    },
    HandOver {
        lease: i64,
        sw: Box<SwitchoverKey>,
        to: String,
    },
    PutIfLeader {
        lease: i64,
        key: &'static str,
        value: Value,
    },
    DeleteIfLeader {
        lease: i64,
        key: &'static str,
    },
    Delete {
        key: &'static str,
    },
    PutMember {
        status: Box<MemberStatus>,
        lease: Option<i64>,
    },
}

/// etcd's answer; a lost request or answer shows as a timeout instead.
#[derive(Debug, Clone)]
pub enum Res {
    View(Box<DcsView>),
    Lease(i64),
    Bool(bool),
    Error,
}

#[derive(Debug, Clone)]
pub enum Ev {
    Wake {
        node: usize,
        epoch: u64,
        gen: u64,
    },
    Arrive {
        node: usize,
        epoch: u64,
        rpc: u64,
        op: Op,
        reply: bool,
    },
    Reply {
        node: usize,
        epoch: u64,
        rpc: u64,
        res: Option<Res>,
    },
    JobDone {
        node: usize,
        epoch: u64,
        job: u64,
    },
    Watch {
        node: usize,
        epoch: u64,
    },
    GuardFire {
        node: usize,
        gen: u64,
    },
    /// The lease keeper's clock (`src/lease.rs`).
    KeeperTick {
        node: usize,
        epoch: u64,
        gen: u64,
    },
    Replicate {
        node: usize,
    },
    Write,
    SyncEffective {
        node: usize,
        set: SyncSet,
    },
    FaultStart(usize),
    FaultEnd(usize),
    AgentBoot {
        node: usize,
    },
    Liveness,
    /// No member's standby start waits for good while a primary runs.
    Settled,
}

struct Item {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    // Reversed: BinaryHeap pops the earliest event first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

pub struct Node {
    pub name: String,
    pub pg: Pg,
    pub agent: Agent,
    rate_ppm: u64,
    offset: u64,
    pub agent_up: bool,
    pub host_up: bool,
    pub paused_until: u64,
    pub frozen_until: u64,
    pub etcd_cut: u32,
    pub stall_until: u64,
    /// True instant at which the fence guard stops Postgres (armed).
    pub guard_deadline: Option<u64>,
    pub guard_gen: u64,
    /// The status the node's API serves (its last published snapshot).
    pub api_status: Option<MemberStatus>,
    /// The pass behind `api_status` saw no leader key (as `/status`'s
    /// `cluster_leader: null`).
    pub api_saw_no_leader: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub events: u64,
    pub decides: u64,
    pub acked: u64,
    pub promotions: u64,
    /// Client writes that went through a node's router.
    pub routed_writes: u64,
    /// Time from the last heal to a writable primary.
    pub recovery_ms: Option<u64>,
}

pub struct World {
    pub sched: Schedule,
    pub cfg: SimConfig,
    pub settings: Settings,
    pub rng: Rng,
    pub now: u64,
    queue: BinaryHeap<Item>,
    seq: u64,
    pub etcd: Etcd,
    pub nodes: Vec<Node>,
    pub next_record: u64,
    pub next_rpc: u64,
    pub next_job: u64,
    acked: Vec<u64>,
    writable: Vec<usize>,
    pub max_promoted_timeline: u32,
    etcd_slow: u32,
    peer_cut: BTreeMap<(usize, usize), u32>,
    notified_revision: i64,
    /// A step the rest of the pass depends on failed (as `Agent::pass_blocked`).
    pub pass_blocked: bool,
    /// Nodes that took the leader key as a switchover's target.
    pub switchover_takers: Vec<usize>,
    pub trace: Option<Vec<String>>,
    pub violation: Option<String>,
    pub stats: Stats,
}

impl World {
    pub fn new(sched: Schedule) -> World {
        let cfg = sched.cfg.clone();
        let mut rng = Rng::new(sched.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xA5A5);
        let mut etcd = Etcd::new();
        etcd.put(
            "initialize",
            Value::Initialize(InitializeKey {
                node: "n1".into(),
                system_identifier: Some(SYSTEM_IDENTIFIER),
            }),
            None,
        )
        .expect("no lease");
        etcd.put(
            "config",
            Value::Config(DynamicConfig {
                synchronous_mode: cfg.sync_mode,
                synchronous_node_count: cfg.sync_count,
                // The election's wait for a `starting` member, within the
                // liveness bound.
                primary_start_timeout_ms: if cfg.knobs.unbounded_start_wait {
                    u64::MAX / 4
                } else {
                    10_000
                },
                ..DynamicConfig::default()
            }),
            None,
        )
        .expect("no lease");
        // A bootstrapped cluster: n1 primary on timeline 1 holding the key,
        // the others streaming replicas with all of its WAL.
        let wal: Vec<u64> = (1..=10).collect();
        let lease = etcd.grant(0, cfg.ttl_ms);
        etcd.put(etcd::LEADER, Value::Leader("n1".into()), Some(lease))
            .expect("lease granted");
        let mut nodes = Vec::new();
        for i in 0..cfg.nodes {
            let name = format!("n{}", i + 1);
            let drift = rng.below(2 * cfg.max_drift_ppm + 1);
            let rate_ppm = 1_000_000 - cfg.max_drift_ppm + drift;
            let offset = rng.range(1_000, 1_000_000);
            let primary = i == 0;
            let pg = Pg {
                dir: Some(DataDir {
                    wal: wal.clone(),
                    timeline: 1,
                    newest_timeline: 1,
                    standby: !primary,
                    checkpoint: 0,
                    shut_down: false,
                    sync_conf: SyncSet::none(),
                    inconsistent: false,
                }),
                running: true,
                role: Some(if primary {
                    PgRole::Primary
                } else {
                    PgRole::Replica
                }),
                upstream: (!primary).then(|| "n1".to_string()),
                slots: if primary {
                    (2..=cfg.nodes).map(|j| format!("n{j}")).collect()
                } else {
                    Vec::new()
                },
                ..Pg::default()
            };
            let mut agent = Agent::default();
            if primary {
                agent.leader_lease = Some(pgha::ha::HeldLease {
                    lease_id: lease,
                    renewed_at: Tick(offset),
                });
            }
            if !primary {
                agent.memory.following = Some("n1".into());
            }
            nodes.push(Node {
                name,
                pg,
                agent,
                rate_ppm,
                offset,
                agent_up: true,
                host_up: true,
                paused_until: 0,
                frozen_until: 0,
                etcd_cut: 0,
                stall_until: 0,
                guard_deadline: None,
                guard_gen: 0,
                api_status: None,
                api_saw_no_leader: false,
            });
        }
        let settings = cfg.settings();
        let mut w = World {
            trace: cfg.knobs.trace.then(Vec::new),
            cfg,
            settings,
            sched,
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            etcd,
            nodes,
            next_record: 1_000,
            next_rpc: 0,
            next_job: 0,
            acked: Vec::new(),
            writable: vec![0],
            max_promoted_timeline: 1,
            etcd_slow: 0,
            peer_cut: BTreeMap::new(),
            notified_revision: 0,
            pass_blocked: false,
            switchover_takers: Vec::new(),
            violation: None,
            stats: Stats::default(),
        };
        w.notified_revision = w.etcd.watched_revision();
        for i in 0..w.nodes.len() {
            w.feed_guard(i);
            let first = w.rng.range(0, w.cfg.loop_wait_ms);
            w.schedule_wake(i, first);
            let r = w.rng.range(20, 200);
            w.push(r, Ev::Replicate { node: i });
        }
        w.push(50, Ev::Write);
        for f in 0..w.sched.faults.len() {
            let at = w.sched.faults[f].at;
            w.push_at(at, Ev::FaultStart(f));
        }
        let live = w.sched.heal_at + w.cfg.ttl_ms + w.cfg.liveness_bound_ms;
        w.push_at(live, Ev::Liveness);
        w.push_at(live + SETTLE_MS, Ev::Settled);
        w
    }

    pub fn log(&mut self, what: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_mut() {
            let line = what();
            t.push(format!("{:>7.3}s {line}", self.now as f64 / 1000.0));
        }
    }

    pub fn fail(&mut self, what: String) {
        self.log(|| format!("VIOLATION: {what}"));
        if self.violation.is_none() {
            self.violation = Some(format!("t={}ms: {what}", self.now));
        }
    }

    pub fn push(&mut self, after: u64, ev: Ev) {
        self.push_at(self.now + after, ev);
    }

    pub fn push_at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Item {
            at,
            seq: self.seq,
            ev,
        });
    }

    /// The node's monotonic clock at the current instant.
    pub fn local_now(&self, i: usize) -> Tick {
        let n = &self.nodes[i];
        Tick(n.offset + (self.now as u128 * n.rate_ppm as u128 / 1_000_000) as u64)
    }

    /// The true instant at which node `i`'s clock reads `tick`.
    pub fn true_time(&self, i: usize, tick: Tick) -> u64 {
        let n = &self.nodes[i];
        let rel = tick.0.saturating_sub(n.offset) as u128;
        (rel * 1_000_000).div_ceil(n.rate_ppm as u128) as u64
    }

    /// Node `i` may act now: its host is up and not frozen.
    pub fn host_running(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        n.host_up && n.frozen_until <= self.now
    }

    /// Postgres on node `i` takes writes at this instant.
    pub fn writable(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        let fenced = n.guard_deadline.is_some_and(|d| d <= self.now);
        self.host_running(i) && n.pg.accepts_writes() && !fenced
    }

    pub fn peers_connected(&self, a: usize, b: usize) -> bool {
        let key = (a.min(b), a.max(b));
        self.peer_cut.get(&key).copied().unwrap_or(0) == 0
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Message loss is a fault too: it stops when every fault has healed.
    fn lost(&mut self) -> bool {
        self.now < self.sched.heal_at && self.rng.chance(self.cfg.loss_permille)
    }

    fn net_delay(&mut self) -> u64 {
        let mut d = self.rng.range(1, 15);
        // Latency spikes are a fault too: they stop once every fault healed.
        if self.now < self.sched.heal_at && self.rng.chance(10) {
            d += self.rng.range(50, 1_000);
        }
        if self.etcd_slow > 0 {
            d += self.rng.range(200, 2_500);
        }
        d
    }

    /// Sends an etcd request from node `i`; with `reply`, the node gets
    /// the answer or, at its retry timeout, `None`.
    pub fn send(&mut self, i: usize, op: Op, reply: bool) -> u64 {
        let timeout = reply.then_some(self.cfg.retry_timeout_ms);
        self.send_within(i, op, timeout)
    }

    /// As `send`, with the request timeout given (`None`: no answer wanted).
    pub fn send_within(&mut self, i: usize, op: Op, timeout: Option<u64>) -> u64 {
        self.next_rpc += 1;
        let rpc = self.next_rpc;
        let epoch = self.nodes[i].agent.epoch;
        let reply = timeout.is_some();
        if let Some(t) = timeout {
            self.push(
                t,
                Ev::Reply {
                    node: i,
                    epoch,
                    rpc,
                    res: None,
                },
            );
        }
        let lost = self.lost();
        if self.nodes[i].etcd_cut == 0 && !lost {
            let d = self.net_delay();
            self.push(
                d,
                Ev::Arrive {
                    node: i,
                    epoch,
                    rpc,
                    op,
                    reply,
                },
            );
        }
        rpc
    }

    fn apply(&mut self, i: usize, op: Op) -> Res {
        let now = self.now;
        let ttl = self.cfg.ttl_ms;
        let name = self.nodes[i].name.clone();
        match op {
            Op::Load => Res::View(Box::new(self.etcd.view())),
            Op::Grant => Res::Lease(self.etcd.grant(now, ttl)),
            Op::CreateLeader { lease } => {
                match self
                    .etcd
                    .create(etcd::LEADER, Value::Leader(name.clone()), Some(lease))
                {
                    Ok(won) => {
                        if won {
                            self.log(|| {
                                format!("etcd: {name} created the leader key (lease {lease:x})")
                            });
                        }
                        Res::Bool(won)
                    }
                    Err(_) => Res::Error,
                }
            }
            Op::KeepAlive { lease } => Res::Bool(self.etcd.keep_alive(now, lease)),
            Op::Revoke { lease } => {
                let gone = self.etcd.revoke(lease);
                if gone.iter().any(|k| k == etcd::LEADER) {
                    self.log(|| {
                        format!("etcd: lease {lease:x} of {name} revoked, leader key deleted")
                    });
                }
                Res::Bool(true)
            }
            Op::ReleaseLeader { lease } => {
                let ok = self.etcd.delete_if_leader(&name, lease, etcd::LEADER);
                if ok {
                    self.log(|| format!("etcd: {name} deleted the leader key"));
                }
                Res::Bool(ok)
            }
            Op::HandOver { lease, sw, to } => {
                let ok = self.etcd.hand_over(&name, lease, &sw, &to);
                if ok {
                    self.log(|| format!("etcd: {name} handed the leader key over to {to}"));
                }
                Res::Bool(ok)
            }
            Op::PutIfLeader { lease, key, value } => {
                Res::Bool(self.etcd.put_if_leader(&name, lease, key, value))
            }
            Op::DeleteIfLeader { lease, key } => {
                Res::Bool(self.etcd.delete_if_leader(&name, lease, key))
            }
            Op::Delete { key } => Res::Bool(self.etcd.delete(key)),
            Op::PutMember { status, lease } => {
                let id = match lease {
                    Some(id) if self.etcd.keep_alive(now, id) => id,
                    _ => self.etcd.grant(now, ttl),
                };
                match self
                    .etcd
                    .put(&etcd::member_key(&name), Value::Member(status), Some(id))
                {
                    Ok(()) => Res::Lease(id),
                    Err(_) => Res::Error,
                }
            }
        }
    }

    /// Runs the schedule to its end or its first violation.
    pub fn run(&mut self) {
        while let Some(item) = self.queue.pop() {
            if item.at > self.sched.end {
                break;
            }
            self.now = item.at;
            self.stats.events += 1;
            let gone = self.etcd.expire(self.now);
            if gone.iter().any(|k| k == etcd::LEADER) {
                self.log(|| "etcd: leader lease expired, leader key deleted".into());
            }
            self.dispatch(item.ev);
            self.notify_watchers();
            self.check();
            if self.violation.is_some() {
                break;
            }
        }
    }

    fn notify_watchers(&mut self) {
        let rev = self.etcd.watched_revision();
        if rev == self.notified_revision {
            return;
        }
        self.notified_revision = rev;
        for i in 0..self.nodes.len() {
            if self.nodes[i].etcd_cut == 0 && self.nodes[i].agent_up {
                let d = self.rng.range(2, 60);
                let epoch = self.nodes[i].agent.epoch;
                self.push(d, Ev::Watch { node: i, epoch });
            }
        }
    }

    /// Events addressed to an agent wait while it (or its host) is paused.
    fn agent_deferred(&mut self, i: usize, ev: &Ev) -> bool {
        let n = &self.nodes[i];
        let until = n.paused_until.max(n.frozen_until);
        if until > self.now {
            self.push_at(until, ev.clone());
            return true;
        }
        false
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Wake { node, epoch, gen } => {
                if !self.agent_alive(node, epoch) || self.agent_deferred(node, &ev) {
                    return;
                }
                if gen == self.nodes[node].agent.wake_gen {
                    self.agent_wake(node);
                }
            }
            Ev::Watch { node, epoch } => {
                if !self.agent_alive(node, epoch) || self.agent_deferred(node, &ev) {
                    return;
                }
                self.agent_poke(node);
            }
            Ev::KeeperTick { node, epoch, gen } => {
                if !self.agent_alive(node, epoch) || self.agent_deferred(node, &ev) {
                    return;
                }
                if gen == self.nodes[node].agent.keeper_gen {
                    self.keeper_tick(node);
                }
            }
            Ev::Arrive {
                node,
                epoch,
                rpc,
                op,
                reply,
            } => {
                if self.nodes[node].etcd_cut > 0 {
                    return;
                }
                let res = self.apply(node, op);
                let lost = self.lost();
                if reply && !lost {
                    let d = self.net_delay();
                    self.push(
                        d,
                        Ev::Reply {
                            node,
                            epoch,
                            rpc,
                            res: Some(res),
                        },
                    );
                }
            }
            Ev::Reply {
                node,
                epoch,
                rpc,
                ref res,
            } => {
                if !self.agent_alive(node, epoch) {
                    return;
                }
                if res.is_some() && self.nodes[node].etcd_cut > 0 {
                    return; // the answer is cut off too
                }
                if self.agent_deferred(node, &ev) {
                    return;
                }
                if let Some((lease, sent_at)) = self.nodes[node].agent.keeper_rpcs.remove(&rpc) {
                    let res = res.clone();
                    self.keeper_reply(node, lease, sent_at, res);
                } else if self.nodes[node].agent.awaiting == Some(rpc) {
                    self.nodes[node].agent.awaiting = None;
                    let res = res.clone();
                    self.agent_reply(node, res);
                }
            }
            Ev::JobDone { node, epoch, job } => {
                // The job's processes (pg_ctl, pg_rewind, ...) run on while
                // the agent is paused; only a frozen host holds them.
                if !self.agent_alive(node, epoch) {
                    return;
                }
                let frozen = self.nodes[node].frozen_until;
                if frozen > self.now {
                    self.push_at(frozen, ev);
                    return;
                }
                self.job_done(node, job);
            }
            Ev::GuardFire { node, gen } => {
                let n = &self.nodes[node];
                if gen != n.guard_gen || !n.host_up {
                    return;
                }
                if n.frozen_until > self.now {
                    let at = n.frozen_until;
                    self.push_at(at, ev);
                    return;
                }
                if self.nodes[node].pg.running {
                    self.log(|| {
                        format!(
                            "n{}: fence guard: fencing deadline passed, SIGQUIT to postgres",
                            node + 1
                        )
                    });
                    self.nodes[node].pg.crash();
                } else if self.nodes[node]
                    .agent
                    .job
                    .as_ref()
                    .is_some_and(|j| j.kind == pgha::ha::Job::Start && j.result.is_none())
                {
                    // postmaster.pid exists from the start on: a starting
                    // postmaster is stopped too.
                    self.log(|| format!("n{}: fence guard: fencing deadline passed, SIGQUIT to the starting postgres", node + 1));
                    self.nodes[node].pg.start_killed = true;
                }
                // The guard disarms once it fired (`armed.take()`): a
                // postmaster started later runs until the agent arms it again.
                self.nodes[node].guard_deadline = None;
            }
            Ev::Replicate { node } => {
                self.replicate(node);
                let d = self.rng.range(30, 250);
                self.push(d, Ev::Replicate { node });
            }
            Ev::Write => {
                for i in 0..self.nodes.len() {
                    if self.writable(i) {
                        self.write(i);
                    }
                }
                self.check_routes();
                let d = self.rng.range(20, 200);
                self.push(d, Ev::Write);
            }
            Ev::SyncEffective { node, set } => {
                let pg = &mut self.nodes[node].pg;
                if pg.running && pg.dir.as_ref().is_some_and(|d| d.sync_conf == set) {
                    pg.effective_sync = set;
                    self.try_ack(node);
                }
            }
            Ev::FaultStart(f) => self.fault_start(f),
            Ev::FaultEnd(f) => self.fault_end(f),
            Ev::AgentBoot { node } => {
                let n = &mut self.nodes[node];
                n.host_up = true;
                n.agent_up = true;
                let epoch = n.agent.epoch + 1;
                n.agent = Agent {
                    epoch,
                    ..Agent::default()
                };
                self.log(|| format!("n{}: agent starts", node + 1));
                self.schedule_wake(node, 0);
            }
            Ev::Settled => {
                let primary = (0..self.nodes.len()).find(|&i| self.writable(i));
                for i in 0..self.nodes.len() {
                    let n = &self.nodes[i];
                    // Every live node's router sends new connections there.
                    if let Some(p) = primary.filter(|_| n.agent_up && n.host_up) {
                        let pname = &self.nodes[p].name;
                        let r = &n.agent.route;
                        let valid = r.valid_until.is_some_and(|t| t > self.local_now(i));
                        if r.primary.as_ref() != Some(pname) || !valid {
                            let (name, pname, r) = (n.name.clone(), pname.clone(), r.clone());
                            self.fail(format!(
                                "router: {name}'s router does not route to {pname}, the writable primary, {SETTLE_MS} ms after the liveness check: {r:?}"
                            ));
                        }
                    }
                    let n = &self.nodes[i];
                    // Every member whose host and agent run follows again.
                    let left_down = primary.is_some()
                        && n.agent_up
                        && n.host_up
                        && !n.pg.running
                        && n.agent.job.is_none();
                    if left_down {
                        let (name, failed) = (n.name.clone(), n.agent.memory.rewind_failed);
                        self.fail(format!(
                            "member left down: {name} runs no Postgres and no job {SETTLE_MS} ms after the liveness check (rewind_failed {failed})"
                        ));
                    }
                    let n = &self.nodes[i];
                    let waiting = n.agent.job.as_ref().filter(|j| {
                        matches!(j.work, crate::agent::Work::Start { primary: false })
                            && j.result.is_none()
                    });
                    if let (Some(p), Some(job)) = (primary, waiting) {
                        if n.agent_up && n.host_up && self.now - job.started >= SETTLE_MS {
                            let (name, pname, ms) = (
                                n.name.clone(),
                                self.nodes[p].name.clone(),
                                self.now - job.started,
                            );
                            self.fail(format!(
                                "stuck standby start: {name} has been starting as a standby for {ms} ms while {pname} is a writable primary"
                            ));
                        }
                    }
                }
            }
            Ev::Liveness => {
                let live = (0..self.nodes.len()).filter(|&i| self.writable(i)).count();
                if live == 0 {
                    for i in 0..self.nodes.len() {
                        let n = &self.nodes[i];
                        let line = format!(
                            "{}: agent up {} phase {:?} awaiting {:?} job {:?} pg running {} role {:?}",
                            n.name,
                            n.agent_up,
                            std::mem::discriminant(&n.agent.phase),
                            n.agent.awaiting,
                            n.agent.job.as_ref().map(|j| (j.kind, j.result.clone())),
                            n.pg.running,
                            n.pg.role
                        );
                        self.log(|| line);
                    }
                    let after = self.now - self.sched.heal_at;
                    self.fail(format!(
                        "liveness: no writable primary {after} ms after the last fault healed (ttl {} ms + bound {} ms)",
                        self.cfg.ttl_ms, self.cfg.liveness_bound_ms
                    ));
                }
            }
        }
    }

    /// Connections through each live node's router go where its route
    /// says while it is valid: never to a primary whose term is over (the
    /// leader key held by another member) while it still takes writes.
    fn check_routes(&mut self) {
        let leader = self.etcd.leader_name();
        for k in 0..self.nodes.len() {
            let n = &self.nodes[k];
            if !(n.agent_up && n.host_up) {
                continue;
            }
            let valid = n
                .agent
                .route
                .valid_until
                .is_some_and(|t| t > self.local_now(k));
            let Some(p) = n.agent.route.primary.clone().filter(|_| valid) else {
                continue;
            };
            let Some(pi) = self.index_of(&p) else {
                continue;
            };
            if !self.writable(pi) {
                continue;
            }
            self.stats.routed_writes += 1;
            if leader.as_ref().is_some_and(|l| *l != p) {
                let (name, l) = (n.name.clone(), leader.clone().unwrap_or_default());
                self.fail(format!(
                    "router: {name}'s router sends writes to {p}, which still takes them, while {l} holds the leader key"
                ));
            }
        }
    }

    fn agent_alive(&self, i: usize, epoch: u64) -> bool {
        let n = &self.nodes[i];
        n.agent_up && n.host_up && n.agent.epoch == epoch
    }

    /// A client commit on node `i`'s primary.
    fn write(&mut self, i: usize) {
        self.next_record += 1;
        let id = self.next_record;
        let pg = &mut self.nodes[i].pg;
        let dir = pg
            .dir
            .as_mut()
            .expect("a running postgres has a data directory");
        dir.wal.push(id);
        let len = dir.wal.len();
        pg.waiting.push((id, len));
        self.try_ack(i);
    }

    /// Acknowledges the waiting commits that the standbys in effect hold
    /// (Postgres releases waiters by the current setting).
    pub fn try_ack(&mut self, i: usize) {
        if self.nodes[i].pg.waiting.is_empty() || !self.writable(i) {
            return;
        }
        let set = self.nodes[i].pg.effective_sync.clone();
        let me = self.nodes[i].name.clone();
        // Flushed positions of the standbys streaming from us.
        let flushed: Vec<(String, usize)> = (0..self.nodes.len())
            .filter(|&j| j != i && self.nodes[j].pg.streaming_from.as_deref() == Some(&me))
            .map(|j| (self.nodes[j].name.clone(), self.nodes[j].pg.len()))
            .collect();
        let any = set.contains("*");
        let mut acked = Vec::new();
        self.nodes[i].pg.waiting.retain(|&(id, len)| {
            let holders = flushed
                .iter()
                .filter(|(n, l)| (any || set.contains(n)) && *l >= len)
                .count() as u32;
            let ok = set.quorum == 0 || holders >= set.quorum;
            if ok {
                acked.push(id);
            }
            !ok
        });
        self.stats.acked += acked.len() as u64;
        // Synchronous mode covers the commits of a primary whose claim is
        // published: before its first claim (mode just switched on, the
        // bootstrap pass) it acknowledges asynchronously.
        if self.cfg.sync_mode != SyncMode::Off && self.etcd.sync_leader() == Some(me.as_str()) {
            self.acked.extend(acked);
        }
    }

    /// One WAL receiver round of node `i`.
    fn replicate(&mut self, i: usize) {
        if !self.host_running(i) {
            return;
        }
        let pg = &self.nodes[i].pg;
        if !pg.running || pg.stopping || pg.role != Some(PgRole::Replica) {
            return;
        }
        let Some(up) = pg.upstream.clone().and_then(|u| self.index_of(&u)) else {
            self.nodes[i].pg.streaming_from = None;
            return;
        };
        let ok = up != i
            && self.host_running(up)
            && self.peers_connected(i, up)
            && self.nodes[up].pg.running
            && self.nodes[up].pg.dir.is_some()
            && {
                let mine = self.nodes[i].pg.dir.as_ref().expect("running");
                let theirs = self.nodes[up].pg.dir.as_ref().expect("checked");
                theirs.timeline >= mine.timeline && mine.is_prefix_of(theirs)
            };
        if !ok {
            if self.nodes[i].pg.streaming_from.take().is_some() {
                let (a, b) = (self.nodes[i].name.clone(), self.nodes[up].name.clone());
                self.log(|| format!("{a}: stopped streaming from {b}"));
            }
            return;
        }
        if self.nodes[i].stall_until > self.now {
            return;
        }
        let (src_wal, src_tl, src_newest) = {
            let d = self.nodes[up].pg.dir.as_ref().expect("checked");
            (d.wal.clone(), d.timeline, d.newest_timeline)
        };
        let upname = self.nodes[up].name.clone();
        let pg = &mut self.nodes[i].pg;
        let dir = pg.dir.as_mut().expect("running");
        let n = dir.wal.len();
        dir.wal.extend_from_slice(&src_wal[n..]);
        dir.timeline = src_tl;
        dir.newest_timeline = dir.newest_timeline.max(src_newest);
        pg.streaming_from = Some(upname);
        self.try_ack(up);
    }

    /// After every event: the safety properties.
    fn check(&mut self) {
        let writable: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.writable(i))
            .collect();
        if writable.len() > 1 {
            let names: Vec<String> = writable
                .iter()
                .map(|&i| self.nodes[i].name.clone())
                .collect();
            self.fail(format!(
                "split brain: {} accept writes at the same instant",
                names.join(" and ")
            ));
            return;
        }
        for &w in &writable {
            if self.writable.contains(&w) {
                continue;
            }
            if self.cfg.sync_mode != SyncMode::Off {
                let wal: std::collections::HashSet<u64> = self.nodes[w]
                    .pg
                    .dir
                    .as_ref()
                    .map(|d| d.wal.iter().copied().collect())
                    .unwrap_or_default();
                let lost: Vec<u64> = self
                    .acked
                    .iter()
                    .copied()
                    .filter(|id| !wal.contains(id))
                    .collect();
                if !lost.is_empty() {
                    let name = self.nodes[w].name.clone();
                    let holders: Vec<String> =
                        self.nodes
                            .iter()
                            .filter(|n| n.pg.dir.as_ref().is_some_and(|d| d.wal.contains(&lost[0])))
                            .map(|n| {
                                let api = n.api_status.as_ref().and_then(|s| {
                                    s.receive_lsn.max(s.replay_lsn).or(s.wal_position)
                                });
                                format!(
                                    "{} (holds {}, its API last reported {})",
                                    n.name,
                                    lsn(n.pg.len()),
                                    api.map_or("nothing".into(), |l| l.to_string())
                                )
                            })
                            .collect();
                    let how = if self.switchover_takers.contains(&w) {
                        " (it took the key as a switchover's target)"
                    } else {
                        ""
                    };
                    self.fail(format!(
                        "lost write: {name} runs as primary without {} acknowledged commit(s) (first: record {}, on {}) in synchronous mode {}{how}",
                        lost.len(),
                        lost[0],
                        if holders.is_empty() { "no node".into() } else { holders.join(", ") },
                        self.cfg.sync_mode
                    ));
                    return;
                }
            }
        }
        self.writable = writable;
        if self.now >= self.sched.heal_at
            && self.stats.recovery_ms.is_none()
            && !self.writable.is_empty()
        {
            self.stats.recovery_ms = Some(self.now - self.sched.heal_at);
        }
    }

    /// Arms the fence guard with the agent's fencing deadline, or disarms it.
    /// The node holds a leader lease whose fencing deadline is still ahead
    /// on its own clock.
    pub fn lease_ahead(&self, i: usize) -> bool {
        let now = self.local_now(i);
        self.nodes[i]
            .agent
            .leader_lease
            .is_some_and(|l| now < self.settings.fencing_deadline(l.renewed_at))
    }

    pub fn feed_guard(&mut self, i: usize) {
        if self.cfg.knobs.no_fencing {
            return;
        }
        let deadline = self.nodes[i]
            .agent
            .leader_lease
            .map(|l| self.true_time(i, self.settings.fencing_deadline(l.renewed_at)));
        if deadline == self.nodes[i].guard_deadline {
            return;
        }
        let n = &mut self.nodes[i];
        n.guard_gen += 1;
        n.guard_deadline = deadline;
        if let Some(at) = deadline {
            let gen = n.guard_gen;
            let at = at.max(self.now);
            self.push_at(at, Ev::GuardFire { node: i, gen });
        }
    }

    fn disarm_guard(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.guard_gen += 1;
        n.guard_deadline = None;
    }

    /// The agent process dies: if it held the lease, the guard stops
    /// Postgres at once (its pipe closed).
    fn kill_agent(&mut self, i: usize) {
        if self.nodes[i].pg.stopping {
            // The fast shutdown was requested already: Postgres stops anyway.
            let _ = self.finish_work(
                i,
                &crate::agent::Work::Stop {
                    checkpoint_first: false,
                },
            );
        }
        let armed = self.nodes[i].guard_deadline.is_some();
        let n = &mut self.nodes[i];
        n.agent_up = false;
        n.agent.epoch += 1;
        if armed && n.pg.running {
            n.pg.crash();
            self.log(|| {
                format!(
                    "n{}: fence guard: agent died holding the lease, SIGQUIT to postgres",
                    i + 1
                )
            });
        }
        self.disarm_guard(i);
    }

    fn fault_start(&mut self, f: usize) {
        let fault = self.sched.faults[f].clone();
        let i = fault.node;
        let name = self.nodes[i].name.clone();
        self.log(|| {
            format!(
                "FAULT {:?} on {name} for {} ms{}",
                fault.kind,
                fault.duration,
                if fault.kind == FaultKind::PeerCut {
                    format!(" (with n{})", fault.other + 1)
                } else {
                    String::new()
                }
            )
        });
        match fault.kind {
            FaultKind::PgCrash => {
                if self.nodes[i].host_up {
                    self.nodes[i].pg.crash();
                }
                return;
            }
            FaultKind::AgentCrash => {
                if !self.nodes[i].agent_up || !self.nodes[i].host_up {
                    return;
                }
                self.kill_agent(i);
                self.push(fault.duration, Ev::AgentBoot { node: i });
                return;
            }
            FaultKind::HostCrash => {
                if !self.nodes[i].host_up {
                    return;
                }
                self.kill_agent(i);
                self.nodes[i].pg.crash();
                self.nodes[i].host_up = false;
                self.push(fault.duration, Ev::AgentBoot { node: i });
                return;
            }
            FaultKind::AgentPause => {
                let until = self.now + fault.duration;
                let n = &mut self.nodes[i];
                n.paused_until = n.paused_until.max(until);
                return;
            }
            FaultKind::HostFreeze => {
                let until = self.now + fault.duration;
                let n = &mut self.nodes[i];
                n.frozen_until = n.frozen_until.max(until);
                return;
            }
            FaultKind::EtcdCut => self.nodes[i].etcd_cut += 1,
            FaultKind::PeerCut => {
                let key = (i.min(fault.other), i.max(fault.other));
                *self.peer_cut.entry(key).or_default() += 1;
            }
            FaultKind::Isolate => {
                self.nodes[i].etcd_cut += 1;
                for j in 0..self.nodes.len() {
                    if j != i {
                        *self.peer_cut.entry((i.min(j), i.max(j))).or_default() += 1;
                    }
                }
            }
            FaultKind::ReplicationStall => {
                let until = self.now + fault.duration;
                let n = &mut self.nodes[i];
                n.stall_until = n.stall_until.max(until);
                return;
            }
            FaultKind::EtcdSlow => self.etcd_slow += 1,
            FaultKind::ClusterRestart => {
                // Only a follower of a leader whose Postgres runs can be
                // part way through a rewind (it rewinds from that leader).
                let leader = self.etcd.leader_name();
                let leader_runs = leader
                    .as_ref()
                    .and_then(|l| self.index_of(l))
                    .is_some_and(|l| self.writable(l));
                let n = self.nodes.len();
                let rewinding = (0..n).map(|k| (i + k) % n).find(|&j| {
                    leader_runs
                        && Some(&self.nodes[j].name) != leader.as_ref()
                        && self.nodes[j].host_up
                        && self.nodes[j].agent_up
                });
                for j in 0..n {
                    if !self.nodes[j].host_up || !self.nodes[j].agent_up {
                        continue;
                    }
                    self.kill_agent(j);
                    // SIGINT: each agent stops its Postgres (fast shutdown).
                    let _ = self.finish_work(
                        j,
                        &crate::agent::Work::Stop {
                            checkpoint_first: false,
                        },
                    );
                    self.push(fault.duration, Ev::AgentBoot { node: j });
                }
                let Some(r) = rewinding else {
                    return;
                };
                let rn = self.nodes[r].name.clone();
                self.log(|| format!("{rn}: rewind cut short by the stop: marker left, data directory inconsistent"));
                let pg = &mut self.nodes[r].pg;
                if let Some(d) = pg.dir.as_mut() {
                    d.inconsistent = true;
                    d.standby = true;
                    d.shut_down = false;
                    pg.rewind_marker = true;
                }
                return;
            }
            FaultKind::Switchover => {
                if let Some(from) = self.etcd.leader_name() {
                    let to = (fault.other != i)
                        .then(|| self.nodes[fault.other].name.clone())
                        .filter(|t| *t != from);
                    let sw = SwitchoverKey {
                        from,
                        to,
                        at_ms: None,
                        requested_ms: EPOCH_MS + self.now,
                        force: false,
                        released_to: None,
                    };
                    // The API answers 409 while one is pending.
                    let _ = self
                        .etcd
                        .create(etcd::SWITCHOVER, Value::Switchover(sw), None);
                }
                return;
            }
        }
        self.push(fault.duration, Ev::FaultEnd(f));
    }

    fn fault_end(&mut self, f: usize) {
        let fault = self.sched.faults[f].clone();
        let i = fault.node;
        self.log(|| format!("HEAL {:?} on n{}", fault.kind, i + 1));
        match fault.kind {
            FaultKind::EtcdCut => self.nodes[i].etcd_cut -= 1,
            FaultKind::PeerCut => {
                let key = (i.min(fault.other), i.max(fault.other));
                *self.peer_cut.get_mut(&key).expect("cut") -= 1;
            }
            FaultKind::Isolate => {
                self.nodes[i].etcd_cut -= 1;
                for j in 0..self.nodes.len() {
                    if j != i {
                        *self.peer_cut.get_mut(&(i.min(j), i.max(j))).expect("cut") -= 1;
                    }
                }
            }
            FaultKind::EtcdSlow => self.etcd_slow -= 1,
            _ => {}
        }
    }

    /// Sim-wide fault counters, for the campaign's fault mix.
    pub fn lsn_of(&self, i: usize) -> pgha::ha::Lsn {
        lsn(self.nodes[i].pg.len())
    }
}
