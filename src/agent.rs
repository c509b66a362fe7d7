//! The agent loop: observe (local Postgres, etcd) -> decide (pure core) ->
//! execute, then publish this member's status and the API snapshot, and wait
//! for an etcd watch event, a finished job, the next tick or shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::clock::epoch_ms;
use crate::config::Config;
use crate::dcs::{Etcd, HistoryEntry};
use crate::ha::{
    self, Action, DataDir, DcsView, DynamicConfig, Handover, HeldLease, Job, JobError,
    LocalPostgres, Lsn, MemberRole, MemberStatus, Memory, Observation, PeerPosition, PgRole,
    Settings, Step, SwitchoverKey, SyncApplied, Tick,
};
use crate::lease::{Lease, LeaseKeeper};
use crate::operator::{self, Call, Reply, Request};
use crate::postgres::{LocalPg, PgError, Unfinished, Upstream};
use crate::snapshot::{LoopHistogram, Snapshot, Transition};

/// Safety margin between the fencing deadline and the lease's expiry.
pub const FENCING_MARGIN: Duration = Duration::from_secs(2);

/// The bound on the put of a handing-over primary's member key as
/// `stopping`, which comes before its checkpoint and stop.
pub const STOPPING_PUT_BOUND: Duration = Duration::from_secs(1);

/// How long, after that put, a primary handing over keeps taking new
/// connections (overlapping its checkpoint): the other agents' routers
/// learn of the stop through their etcd watch within this and hold new
/// clients for the new primary instead of sending them into a shutdown.
pub const ROUTERS_SEE_KEY: Duration = Duration::from_millis(150);

/// The longest a bootstrap from the repository may spend in recovery after
/// the restore (replaying the archived WAL to its target).
const BOOTSTRAP_RECOVERY_LIMIT: Duration = Duration::from_secs(3600);

/// Time left at `at` of a window that opened when `lease` was last renewed.
fn remaining(lease: Option<Lease>, window: Duration, at: Instant) -> Option<Duration> {
    lease.map(|l| (l.renewed_at + window).saturating_duration_since(at))
}

/// The parts of this member's status that come from its configuration.
fn identity(cfg: &Config) -> MemberStatus {
    MemberStatus {
        name: cfg.name.clone(),
        role: MemberRole::Uninitialized,
        state: "starting".into(),
        timeline: None,
        wal_position: None,
        receive_lsn: None,
        replay_lsn: None,
        pg_host: cfg.postgresql.advertise_host.clone(),
        pg_port: cfg.postgresql.advertise_port,
        api_url: cfg.api.advertise_url.clone(),
        nofailover: cfg.tags.nofailover,
        noloadbalance: cfg.tags.noloadbalance,
        nosync: cfg.tags.nosync,
        failover_priority: cfg.tags.failover_priority,
        tags: cfg.tags.extra.clone(),
        region: cfg.region.clone(),
        basebackup: None,
        pending_restart: false,
        replay_paused: false,
        router_rw: router_address(cfg, Some(cfg.router.listen)),
        router_ro: router_address(cfg, cfg.router.replica_listen),
        archiver: None,
        updated_at_ms: epoch_ms(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Where other hosts reach a router listener bound at `listen`: the
/// listen address itself when it is a specific one, else this node's
/// advertised host with the listener's port. `None` with the router off.
fn router_address(cfg: &Config, listen: Option<std::net::SocketAddr>) -> Option<String> {
    let listen = listen.filter(|_| cfg.router.enabled)?;
    let host = if listen.ip().is_unspecified() {
        cfg.postgresql.advertise_host.clone()
    } else {
        listen.ip().to_string()
    };
    Some(crate::net::host_port(&host, listen.port()))
}

pub fn settings_for(cfg: &Config) -> Settings {
    let margin = FENCING_MARGIN.min(cfg.timing.ttl / 3);
    Settings {
        ttl_ms: cfg.timing.ttl.as_millis() as u64,
        fencing_margin_ms: margin.as_millis() as u64,
        rewind_after_ms: 5_000,
        handover_timeout_ms: 10_000,
        balancer_window_ms: cfg.api.balancer_window.as_millis() as u64,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("refusing to continue: {0}")]
    Refused(String),
    #[error("{0}")]
    Setup(String),
}

struct RunningJob {
    kind: Job,
    /// A `Start` of Postgres as a standby.
    standby: bool,
    handle: JoinHandle<Result<(), JobError>>,
}

pub struct Agent {
    cfg: Config,
    settings: Settings,
    pg: Arc<LocalPg>,
    etcd: Etcd,
    started: Instant,
    /// The leader lease, kept alive by its own task, and the fence guard.
    lease: LeaseKeeper,
    member_lease: Option<i64>,
    job: Option<RunningJob>,
    data_dir: Option<DataDir>,
    /// What the HA core remembers between passes (`ha::Memory`).
    memory: Memory,
    history: Vec<HistoryEntry>,
    last_error: Option<String>,
    last_local: LocalPostgres,
    shutting_down: bool,
    failsafe: Arc<crate::failsafe::Promise>,
    /// A step the rest of this pass depends on failed: skip the rest.
    pass_blocked: bool,
    dcs_last_seen: Option<Instant>,
    promotions: u64,
    loop_durations: LoopHistogram,
    snapshot: watch::Sender<Arc<Snapshot>>,
    job_done: mpsc::Sender<()>,
    job_done_rx: mpsc::Receiver<()>,
    calls_tx: mpsc::Sender<Call>,
    /// Where this node's router sends new connections (`ha::route`).
    routes: watch::Sender<crate::router::Route>,
    /// When the last etcd read was sent.
    read_sent: Tick,
    /// The route last published, by member name.
    route: ha::RouteChoice,
    calls_rx: mpsc::Receiver<Call>,
    /// The backup repository, while `[backup]` is on: a new cluster's first
    /// leader restores from it with `backup.bootstrap_from`, a replica with
    /// `postgresql.clone_from = "backup"`.
    pgbackrest: Option<crate::backup::Pgbackrest>,
}

/// Creates the empty data directory and marks it as being written, like a
/// clone: a restore cut short leaves a partial copy the agent wrote itself,
/// removed on the next start.
fn begin_restore(pg: &LocalPg) -> Result<crate::postgres::JobMarker, String> {
    pg.create_data_dir().map_err(|e| e.to_string())?;
    let marker = pg.job_marker();
    marker
        .begin(crate::postgres::Unfinished::Clone, "backup repository")
        .map_err(|e| e.to_string())?;
    Ok(marker)
}

/// Removes what a failed clone wrote into the directory that was empty
/// before it, and its marker, so that another clone can begin.
fn discard_partial_clone(pg: &LocalPg) {
    let _ = std::fs::remove_dir_all(&pg.cfg.data_dir);
    let _ = pg.job_marker().finish();
}

/// A replica's empty data directory restored from the newest backup and
/// configured to follow `up`; what a failure wrote is removed again (the
/// directory was empty), so pg_basebackup can take over.
async fn clone_from_repository(
    pg: &LocalPg,
    pgbackrest: &crate::backup::Pgbackrest,
    up: &Upstream,
) -> Result<(), String> {
    let marker = begin_restore(pg)?;
    let began = Instant::now();
    let restored = async {
        pgbackrest
            .restore_for_standby()
            .await
            .map_err(|e| e.to_string())?;
        pg.write_config(true, Some(up)).map_err(|e| e.to_string())
    }
    .await;
    match restored {
        Ok(()) => {
            info!(
                seconds = began.elapsed().as_secs_f64(),
                upstream = %up.name,
                "cloned from the backup repository: replaying the archive, then streaming"
            );
            marker.finish().map_err(|e| e.to_string())
        }
        Err(e) => {
            discard_partial_clone(pg);
            Err(e)
        }
    }
}

impl Agent {
    /// The backup repository's adapter, while `[backup]` is on.
    pub fn pgbackrest(&self) -> Option<crate::backup::Pgbackrest> {
        self.pgbackrest.clone()
    }

    pub async fn new(cfg: Config) -> Result<(Agent, watch::Receiver<Arc<Snapshot>>), AgentError> {
        let pg = LocalPg::new(cfg.postgresql.clone(), cfg.name.clone())
            .map_err(|e| AgentError::Setup(e.to_string()))?;
        let etcd = Etcd::connect(&cfg.etcd, cfg.timing.retry_timeout)
            .await
            .map_err(|e| AgentError::Setup(e.to_string()))?;
        let me = identity(&cfg);
        let snapshot = Snapshot {
            taken_at: Instant::now(),
            scope: cfg.scope.clone(),
            me,
            leader: None,
            leader_revision: None,
            members: Vec::new(),
            history: Vec::new(),
            config: None,
            dcs_reachable: false,
            dcs_last_seen: None,
            lease_remaining: None,
            fencing_remaining: None,
            pending_restart: false,
            paused: false,
            sync: None,
            sync_standbys: None,
            switchover: None,
            promotions: 0,
            loop_durations: LoopHistogram::default(),
            last_error: None,
            route: None,
            transition: None,
        };
        let settings = settings_for(&cfg);
        let fence_window = Duration::from_millis(settings.fence_window_ms());
        // Its own connection: a renewal never queues behind the loop's requests.
        let lease_etcd = Etcd::connect(&cfg.etcd, fence_window)
            .await
            .map_err(|e| AgentError::Setup(e.to_string()))?;
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        // Every renewal moves the deadlines the API judges /primary by, also
        // while a slow pass has not published a snapshot yet.
        let snapshots = tx.clone();
        let ttl = cfg.timing.ttl;
        let on_change = Box::new(move |lease: Option<Lease>| {
            snapshots.send_modify(|s| {
                let s = Arc::make_mut(s);
                s.lease_remaining = remaining(lease, ttl, s.taken_at);
                s.fencing_remaining = remaining(lease, fence_window, s.taken_at);
            })
        });
        let lease = LeaseKeeper::spawn(
            lease_etcd,
            cfg.postgresql.data_dir.clone(),
            fence_window,
            crate::lease::renew_period(fence_window, cfg.timing.loop_wait),
            on_change,
        )
        .map_err(|e| AgentError::Setup(format!("cannot start the fence guard: {e}")))?;
        let (job_done, job_done_rx) = mpsc::channel(4);
        let (calls_tx, calls_rx) = mpsc::channel(16);
        let (routes, _) = watch::channel(crate::router::Route::none());
        let pgbackrest = cfg
            .backup
            .enabled
            .then(|| crate::backup::Pgbackrest::new(&cfg.backup, &cfg.postgresql))
            .transpose()
            .map_err(|e| AgentError::Setup(e.to_string()))?;
        // pgbackrest.conf before Postgres starts: its archive_command reads it.
        if let Some(p) = &pgbackrest {
            p.prepare()
                .map_err(|e| AgentError::Setup(format!("cannot set up pgBackRest: {e}")))?;
        }
        Ok((
            Agent {
                settings,
                pg: Arc::new(pg),
                etcd,
                started: Instant::now(),
                lease,
                member_lease: None,
                job: None,
                data_dir: None,
                memory: Memory::default(),
                history: Vec::new(),
                last_error: None,
                last_local: LocalPostgres::default(),
                shutting_down: false,
                failsafe: Arc::default(),
                pass_blocked: false,
                dcs_last_seen: None,
                promotions: 0,
                loop_durations: LoopHistogram::default(),
                snapshot: tx,
                job_done,
                job_done_rx,
                calls_tx,
                calls_rx,
                routes,
                read_sent: Tick(0),
                route: ha::RouteChoice::default(),
                pgbackrest,
                cfg,
            },
            rx,
        ))
    }

    fn now(&self) -> Tick {
        Tick(self.started.elapsed().as_millis() as u64)
    }

    /// The failsafe confirmations the API gives on this node's behalf.
    pub fn failsafe_promise(&self) -> Arc<crate::failsafe::Promise> {
        self.failsafe.clone()
    }

    /// The leader lease we hold, in the decision logic's clock.
    fn leader_lease(&self) -> Option<HeldLease> {
        self.lease.held().map(|l| HeldLease {
            lease_id: l.lease_id,
            renewed_at: self.tick_of(l.renewed_at),
        })
    }

    /// How long one decision to lead keeps the lease renewed: up to the
    /// next pass, which may itself wait out two etcd timeouts.
    fn renew_window(&self) -> Duration {
        self.cfg.timing.loop_wait + 2 * self.cfg.timing.retry_timeout
    }

    /// We hold a leader lease whose fencing deadline is still ahead.
    fn lease_ahead(&self) -> bool {
        let now = self.now();
        self.leader_lease()
            .is_some_and(|l| now < self.settings.fencing_deadline(l.renewed_at))
    }

    fn instant_of(&self, t: Tick) -> std::time::Instant {
        self.started + Duration::from_millis(t.0)
    }

    fn tick_of(&self, at: Instant) -> Tick {
        Tick(at.saturating_duration_since(self.started).as_millis() as u64)
    }

    /// Failsafe mode, etcd unreachable, we lead: ask every member we last
    /// saw in etcd to confirm us. When all do, that counts as a lease
    /// renewal sent when we asked; when one does not, the fencing deadline
    /// runs out as usual.
    async fn failsafe_round(&self) -> Option<Instant> {
        self.lease.held()?;
        let view = self
            .memory
            .last_view
            .as_ref()
            .filter(|v| v.config.failsafe_mode)?;
        let others: Vec<(String, String)> = view
            .members
            .iter()
            .filter(|m| m.name != self.cfg.name)
            .map(|m| (m.name.clone(), m.api_url.clone()))
            .collect();
        let sent_at = Instant::now();
        let timeout = self.cfg.timing.retry_timeout.min(Duration::from_secs(1));
        let body = serde_json::json!({ "leader": self.cfg.name });
        let asks = others.iter().map(|(name, url)| {
            let body = body.clone();
            async move {
                let answer = tokio::time::timeout(
                    timeout,
                    crate::ctl::send(url, hyper::Method::POST, "/failsafe", Some(&body), None),
                )
                .await;
                match answer {
                    Ok(Ok((200, _))) => Ok(()),
                    Ok(Ok((status, v))) => Err(format!("{name}: {status} {}", v["message"])),
                    Ok(Err(e)) => Err(format!("{name}: {e}")),
                    Err(_) => Err(format!("{name}: no answer within {timeout:?}")),
                }
            }
        });
        let refusals: Vec<String> = futures_util::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if refusals.is_empty() {
            info!(
                members = others.len(),
                "failsafe: every member confirmed us while etcd is unreachable"
            );
            Some(sent_at)
        } else {
            warn!(refusals = ?refusals, "failsafe: not every member confirmed us; the fencing deadline stands");
            None
        }
    }

    /// A failsafe confirmation counts as a lease renewal sent at `at`; the
    /// fence guard hears of it at once.
    fn failsafe_confirmed(&mut self, at: Option<Instant>) {
        if let Some(at) = at {
            self.lease.confirmed(at);
        }
    }

    /// Where the API sends operator requests.
    pub fn operator_handle(&self) -> mpsc::Sender<Call> {
        self.calls_tx.clone()
    }

    /// The route this node's router follows, updated every pass.
    pub fn routes(&self) -> watch::Receiver<crate::router::Route> {
        self.routes.subscribe()
    }

    /// Republishes the API's snapshot at once for a role change, ahead of
    /// the end of the pass. `taken_at` stays the last pass's: staleness
    /// still measures the loop.
    fn announce(&self, change: impl FnOnce(&mut Snapshot)) {
        self.snapshot.send_modify(|s| change(Arc::make_mut(s)));
    }

    /// Publishes where new connections go, from this pass's observation
    /// and the job running now (a stop begun since `obs` counts).
    fn publish_route(&mut self, obs: &Observation) {
        let job = self.job.as_ref().map(|j| j.kind);
        let fence_window = self.settings.fence_window_ms();
        let choice = if job == obs.job {
            ha::route(obs, &self.memory, fence_window)
        } else {
            let now = Observation { job, ..obs.clone() };
            ha::route(&now, &self.memory, fence_window)
        };
        let backend = |name: &String| {
            self.upstream(name)
                .map(|u| crate::router::Backend::new(u.name, u.host, u.port))
        };
        let route = crate::router::Route {
            primary: choice.primary.as_ref().and_then(backend),
            replicas: choice.replicas.iter().filter_map(backend).collect(),
            valid_until: choice.valid_until.map(|t| self.instant_of(t)),
        };
        self.routes.send_if_modified(|current| {
            let changed = *current != route;
            if changed {
                *current = route;
            }
            changed
        });
        self.route = choice;
    }

    /// Answers one operator request. Long work runs as a job that sends the
    /// reply when it is done, so the loop keeps renewing meanwhile.
    async fn handle(&mut self, call: Call) {
        let node = self.cfg.name.clone();
        info!(request = ?call.request, "operator request");
        // A job that already answered its own request may not be reaped
        // yet: give it a moment, so the next request does not see it busy.
        for _ in 0..20 {
            self.reap_job().await;
            if self.job.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let busy = self.job.as_ref().map(|j| j.kind);
        let leads = self.lease.held().is_some();
        let reply = match call.request {
            Request::Reload => {
                if !self.last_local.running {
                    Reply::message(503, "postgres is not running")
                } else {
                    let standby = self.last_local.role == Some(PgRole::Replica);
                    let up = self
                        .memory
                        .following
                        .as_deref()
                        .and_then(|f| self.upstream(f));
                    match self.pg.write_config(standby, up.as_ref()) {
                        Ok(()) => match self.pg.reload().await {
                            Ok(()) => Reply::message(200, "postgres configuration reloaded"),
                            Err(e) => Reply::message(503, format!("reload failed: {e}")),
                        },
                        Err(e) => {
                            Reply::message(503, format!("writing the configuration failed: {e}"))
                        }
                    }
                }
            }
            Request::Restart { .. } | Request::Reinitialize if busy.is_some() => {
                Reply::message(409, format!("{busy:?} is already in progress on {node}"))
            }
            Request::Restart {
                pending_only: true, ..
            } if !self.last_local.pending_restart => {
                Reply::message(200, format!("no restart pending on {node}: nothing done"))
            }
            // Patroni's answer when a restart condition does not hold.
            Request::Restart {
                role: Some(role), ..
            } if self.last_local.role != Some(role) => Reply::message(
                503,
                format!("restart conditions are not satisfied: {node} does not run as {role:?}"),
            ),
            Request::Restart { .. } => {
                if !self.last_local.running {
                    Reply::message(503, "postgres is not running: nothing to restart")
                } else {
                    let pg = self.pg.clone();
                    let reply_to = call.reply;
                    self.spawn_job(Job::Start, async move {
                        let result = async {
                            pg.stop(Duration::from_secs(60)).await?;
                            pg.start(Duration::from_secs(300)).await
                        }
                        .await;
                        let reply = match &result {
                            Ok(()) => Reply::message(200, "restarted successfully"),
                            Err(e) => Reply::message(503, format!("restart failed: {e}")),
                        };
                        let _ = reply_to.send(reply);
                        result.map_err(|e| e.to_string())
                    });
                    return;
                }
            }
            Request::Reinitialize => {
                if leads
                    || self
                        .memory
                        .last_view
                        .as_ref()
                        .and_then(|v| v.leader.as_ref())
                        .is_some_and(|l| l.name == node)
                {
                    Reply::message(
                        412,
                        "refusing to reinitialize the leader: switch over first",
                    )
                } else {
                    let pg = self.pg.clone();
                    let reply_to = call.reply;
                    warn!("reinitialize requested: the data directory will be removed and cloned again");
                    self.spawn_job(Job::Stop, async move {
                        let result = async {
                            pg.stop(Duration::from_secs(60))
                                .await
                                .map_err(|e| e.to_string())?;
                            match std::fs::remove_dir_all(&pg.cfg.data_dir) {
                                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                                    Err(format!("removing {}: {e}", pg.cfg.data_dir.display()))
                                }
                                _ => Ok(()),
                            }
                        }
                        .await;
                        let reply = match &result {
                            Ok(()) => Reply::message(
                                200,
                                "data directory removed: the replica is cloned again",
                            ),
                            Err(e) => Reply::message(503, format!("reinitialize failed: {e}")),
                        };
                        let _ = reply_to.send(reply);
                        result
                    });
                    return;
                }
            }
            Request::Switchover {
                leader,
                candidate,
                at_ms,
            } => match self.switchover_request(Some(leader), candidate, at_ms, false) {
                Ok(sw) => return self.start_switchover(sw, call.reply).await,
                Err(reply) => reply,
            },
            Request::Failover {
                leader,
                candidate,
                force,
            } => {
                let current = self
                    .memory
                    .last_view
                    .as_ref()
                    .and_then(|v| v.leader.as_ref())
                    .map(|l| l.name.clone());
                let request = match &current {
                    Some(_) if !force => {
                        self.switchover_request(leader, Some(candidate), None, false)
                    }
                    _ => self.switchover_request(leader, Some(candidate), None, true),
                };
                match request {
                    Ok(sw) => return self.start_switchover(sw, call.reply).await,
                    Err(reply) => reply,
                }
            }
            Request::CancelSwitchover => match self.etcd.clear_switchover().await {
                Ok(true) => Reply::message(200, "switchover cancelled"),
                Ok(false) => Reply::message(404, "no switchover is pending"),
                Err(e) => Reply::message(503, format!("etcd write failed: {e}")),
            },
            Request::PatchConfig(patch) => {
                self.change_config(|c| operator::patch_config(c, &patch))
                    .await
            }
            Request::PutConfig(doc) => self.change_config(|_| operator::parse_config(&doc)).await,
        };
        let _ = call.reply.send(reply);
    }

    /// Checks a switchover or failover request against the last view of the
    /// cluster: the answer is the key to write, or the refusal (412).
    fn switchover_request(
        &self,
        leader: Option<String>,
        candidate: Option<String>,
        at_ms: Option<u64>,
        force: bool,
    ) -> Result<SwitchoverKey, Reply> {
        let Some(view) = &self.memory.last_view else {
            return Err(Reply::message(503, "etcd has not been read yet"));
        };
        // Judge members by what was last published, but this node by its
        // own latest status (its key in etcd may be a pass behind).
        let mut view = view.clone();
        view.members = self.snapshot.borrow().members.clone();
        let view = &view;
        let current = view.leader.as_ref().map(|l| l.name.clone());
        if let Some(pending) = &view.switchover {
            return Err(Reply::message(
                409,
                format!("a switchover from {} is already pending", pending.from),
            ));
        }
        if let Some(asked) = &leader {
            if Some(asked) != current.as_ref() {
                let now = current.as_deref().unwrap_or("nobody");
                return Err(Reply::message(
                    412,
                    format!("{asked} is not the leader ({now} is)"),
                ));
            }
        }
        if let Some(c) = &candidate {
            if view.member(c).is_none() {
                return Err(Reply::message(
                    412,
                    format!("{c} is not a member of the cluster"),
                ));
            }
            if Some(c) == current.as_ref() {
                return Err(Reply::message(412, format!("{c} is already the leader")));
            }
        }
        if !force {
            let Some(cur) = &current else {
                return Err(Reply::message(
                    412,
                    "no leader to switch over from: use failover",
                ));
            };
            let top = view
                .member(cur)
                .and_then(|m| m.wal_position)
                .unwrap_or_default();
            let healthy = ha::handover::healthy_replicas_of(cur, top, view);
            match &candidate {
                Some(c) if !healthy.iter().any(|m| &m.name == c) => {
                    let m = view.member(c).expect("checked");
                    let why = if m.nofailover {
                        "tagged nofailover".to_string()
                    } else if m.state != "streaming" {
                        format!("not streaming (state {})", m.state)
                    } else {
                        "lagging above maximum_lag_on_failover or outside primary_region"
                            .to_string()
                    };
                    return Err(Reply::message(412, format!("{c} cannot take over: {why}")));
                }
                None if healthy.is_empty() => {
                    return Err(Reply::message(
                        412,
                        "no healthy streaming replica to switch over to",
                    ));
                }
                _ => {}
            }
        }
        if at_ms.is_some_and(|at| at + 24 * 3600 * 1000 < epoch_ms()) {
            return Err(Reply::message(422, "scheduled_at lies in the past"));
        }
        Ok(SwitchoverKey {
            from: current.unwrap_or_default(),
            to: candidate,
            at_ms,
            requested_ms: epoch_ms(),
            force,
            released_to: None,
        })
    }

    /// Writes the switchover key; a task answers once the leader changed
    /// (200), at once when it is scheduled for later (202).
    async fn start_switchover(
        &self,
        sw: SwitchoverKey,
        reply: tokio::sync::oneshot::Sender<Reply>,
    ) {
        match self.etcd.request_switchover(&sw).await {
            Ok(true) => {}
            Ok(false) => {
                let _ = reply.send(Reply::message(409, "a switchover is already pending"));
                return;
            }
            Err(e) => {
                let _ = reply.send(Reply::message(503, format!("etcd write failed: {e}")));
                return;
            }
        }
        info!(from = %sw.from, to = ?sw.to, force = sw.force, "switchover requested");
        if sw.at_ms.is_some_and(|at| at > epoch_ms()) {
            let _ = reply.send(Reply::message(
                202,
                format!("switchover scheduled from {}", sw.from),
            ));
            return;
        }
        let etcd = self.etcd.clone();
        let wait = self.cfg.timing.shutdown_timeout;
        let wait_for_switchover = async move {
            let deadline = Instant::now() + wait;
            let answer = loop {
                if let Ok((view, _)) = etcd.load().await {
                    let leader = view.leader.as_ref().map(|l| l.name.clone());
                    let moved = leader
                        .as_ref()
                        .is_some_and(|l| *l != sw.from && sw.to.as_ref().is_none_or(|t| t == l));
                    if moved && view.switchover.is_none() {
                        break Reply::message(
                            200,
                            format!("switched over to {}", leader.unwrap_or_default()),
                        );
                    }
                    if view.switchover.is_none() && !moved {
                        break Reply::message(412, "switchover aborted: see the leader's log");
                    }
                }
                if Instant::now() >= deadline {
                    break Reply::message(
                        503,
                        "switchover did not complete in time; it may still complete",
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let _ = reply.send(answer);
        };
        tokio::spawn(wait_for_switchover.in_current_span());
    }

    async fn change_config(
        &self,
        change: impl Fn(&DynamicConfig) -> Result<DynamicConfig, String>,
    ) -> Reply {
        match self.etcd.update_config(change).await {
            Ok(Ok(config)) => {
                info!(?config, "dynamic config changed");
                Reply::ok(serde_json::to_value(config).expect("serializes"))
            }
            Ok(Err(refused)) => Reply::message(422, refused),
            Err(e) => Reply::message(503, format!("etcd write failed: {e}")),
        }
    }

    /// Runs until `shutdown` is cancelled (then stops Postgres and releases
    /// what this node holds) or a refusal ends it.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), AgentError> {
        info!(scope = %self.cfg.scope, "agent starting");
        let (wake_tx, mut wake_rx) = mpsc::channel(16);
        let watcher = tokio::spawn(
            watch_cluster(self.etcd.clone(), wake_tx, shutdown.clone()).in_current_span(),
        );
        let mut shutdown_deadline: Option<Instant> = None;
        let result = loop {
            let loop_started = Instant::now();
            if let Err(e) = self.pass().await {
                break Err(e);
            }
            self.loop_durations.observe(loop_started.elapsed());
            debug!(
                elapsed_ms = loop_started.elapsed().as_millis() as u64,
                "loop pass"
            );
            if let Some(deadline) = shutdown_deadline {
                if self.graceful_stop_done() || Instant::now() >= deadline {
                    break Ok(());
                }
            }
            // A fixed cadence, as Patroni keeps: the pass's own time counts
            // toward the wait. Sleeping a whole loop_wait after a pass that
            // itself took seconds (etcd round trips on a slow or lossy link)
            // spaced the lease renewals by pass + loop_wait, past the
            // fencing deadline while the lease was still held.
            let wait = self.next_wait().saturating_sub(loop_started.elapsed());
            tokio::select! {
                _ = shutdown.cancelled(), if shutdown_deadline.is_none() => {
                    shutdown_deadline = Some(Instant::now() + self.cfg.timing.shutdown_timeout);
                    if !self.begin_graceful_stop().await {
                        break Ok(());
                    }
                }
                _ = wake_rx.recv() => {
                    // Coalesce a burst of events into one pass.
                    while wake_rx.try_recv().is_ok() {}
                }
                _ = self.job_done_rx.recv() => {}
                Some(call) = self.calls_rx.recv() => self.handle(call).await,
                _ = tokio::time::sleep(wait) => {}
            }
        };
        watcher.abort();
        self.shut_down().await;
        result
    }

    /// On SIGINT/SIGTERM a leader hands over to a healthy replica before it
    /// stops (a switchover request to itself); false when there is nothing
    /// to hand over and the agent can stop at once.
    async fn begin_graceful_stop(&mut self) -> bool {
        self.shutting_down = true;
        let node = self.cfg.name.clone();
        let leading = self.lease.held().is_some()
            && self.last_local.running
            && self.last_local.role == Some(PgRole::Primary);
        if !leading {
            return false;
        }
        // No new writers from now on; the handover finishes the rest.
        self.announce(|s| s.transition = Some(Transition::SteppingDown));
        let sw = SwitchoverKey {
            from: node.clone(),
            to: None,
            at_ms: None,
            requested_ms: epoch_ms(),
            force: false,
            released_to: None,
        };
        match self.etcd.request_switchover(&sw).await {
            Ok(created) => {
                info!(created, "stopping: handing leadership over first");
                true
            }
            Err(e) => {
                warn!(error = %e, "stopping: cannot request a handover");
                false
            }
        }
    }

    /// A graceful stop is complete once no switchover is pending any more:
    /// the new leader cleared it after taking over, or it was aborted (then
    /// `shut_down` stops Postgres and releases the key itself).
    fn graceful_stop_done(&self) -> bool {
        self.job.is_none()
            && self
                .memory
                .last_view
                .as_ref()
                .is_none_or(|v| v.switchover.is_none())
    }

    /// Time until the next pass: `loop_wait`, backing off while etcd is
    /// unreachable unless we hold a lease that still needs renewing.
    fn next_wait(&self) -> Duration {
        let base = self.cfg.timing.loop_wait;
        // During a switchover every member polls fast: the leader waits for
        // its target's position, and the target's published status must be fresh.
        if self
            .memory
            .last_view
            .as_ref()
            .is_some_and(|v| v.switchover.is_some())
            || self.memory.handover.is_some()
        {
            return base.min(Duration::from_millis(100));
        }
        if self.memory.etcd_failures == 0 || self.lease.held().is_some() {
            return base;
        }
        let factor = 1u32 << self.memory.etcd_failures.saturating_sub(1).min(4);
        (base * factor).min(Duration::from_secs(8).max(base))
    }

    /// One observe -> decide -> execute pass.
    async fn pass(&mut self) -> Result<(), AgentError> {
        self.reap_job().await;
        let mut obs = self.observe().await;
        self.publish_route(&obs);
        let now = self.now();
        let steps = ha::decide(&obs, &self.settings, now);
        self.pass_blocked = false;
        let promotions = self.promotions;
        for step in steps {
            self.execute(step, &obs).await?;
            self.lease.feed_guard();
            if self.pass_blocked {
                break;
            }
        }
        self.lease.feed_guard();
        if self.promotions != promotions {
            // Observed before the promotion, `local` no longer holds:
            // publish what the promotion step found Postgres to be.
            obs.local = self.last_local.clone();
        }
        self.apply_dynamic_parameters(&obs).await;
        self.publish(&obs).await;
        Ok(())
    }

    /// Cluster-wide Postgres parameters changed in the dynamic config:
    /// rewrite postgresql.conf and reload. Parameters that need a restart
    /// show up as `pending_restart` until `pgha restart NODE --pending`.
    async fn apply_dynamic_parameters(&mut self, obs: &Observation) {
        let Some(view) = &obs.dcs else { return };
        if !self.pg.set_dynamic_parameters(&view.config.parameters) {
            return;
        }
        let running = obs.local.running && obs.job.is_none() && self.job.is_none();
        if !running {
            // Written with the next start.
            return;
        }
        let standby = obs.local.role == Some(PgRole::Replica);
        let upstream = self
            .memory
            .following
            .clone()
            .and_then(|u| self.upstream(&u));
        let result = match self.pg.write_config(standby, upstream.as_ref()) {
            Ok(()) => self.pg.reload().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                info!(parameters = ?view.config.parameters, "cluster-wide parameters applied by reload")
            }
            Err(e) => {
                warn!(error = %e, "could not apply cluster-wide parameters");
                // Try again next pass.
                self.pg.set_dynamic_parameters(&Default::default());
            }
        }
    }

    async fn reap_job(&mut self) {
        let finished = self.job.as_ref().is_some_and(|j| j.handle.is_finished());
        if !finished {
            return;
        }
        let job = self.job.take().expect("checked");
        match job.handle.await {
            Ok(result) => {
                match &result {
                    Ok(()) => {
                        info!(job = ?job.kind, "job finished");
                        self.last_error = None;
                    }
                    Err(e @ JobError::Retry(_)) => {
                        warn!(job = ?job.kind, error = %e, "job not done");
                        self.last_error = Some(format!("{:?}: {e}", job.kind));
                    }
                    Err(e) => {
                        error!(job = ?job.kind, error = %e, "job failed");
                        self.last_error = Some(format!("{:?}: {e}", job.kind));
                    }
                }
                self.memory
                    .job_finished(job.kind, result.as_ref().map(|_| ()));
            }
            Err(e) => error!(job = ?job.kind, error = %e, "job panicked"),
        }
        // Whatever the job did to the data directory, look again.
        self.data_dir = None;
    }

    async fn observe(&mut self) -> Observation {
        let now = self.now();
        if let Some(status) = self.pg.child_exited().await {
            warn!(%status, "postgres exited");
            self.memory.postgres_exited();
        }
        let local = if self
            .job
            .as_ref()
            .is_some_and(|j| matches!(j.kind, Job::InitDb | Job::Clone | Job::Rewind))
        {
            LocalPostgres::default()
        } else {
            self.pg.probe().await
        };
        let mut local = local;
        self.memory.local_seen(&mut local, now);
        if self.job.is_none() && !local.running {
            self.check_job_marker().await;
        }
        if self.data_dir.is_none() || !local.running {
            match self.pg.inspect_data_dir().await {
                Ok(d) => self.data_dir = Some(d),
                Err(e) => warn!(error = %e, "cannot inspect data directory"),
            }
        }
        let data_dir = self.data_dir.unwrap_or(DataDir::Unusable);
        let (last_role, checkpoint_lsn) = match (local.running, data_dir) {
            (false, DataDir::Initialized { .. }) if self.job.is_none() => (
                self.pg.last_role().await.unwrap_or(None),
                self.pg.shutdown_checkpoint().await.unwrap_or(None),
            ),
            _ => (None, None),
        };
        self.memory.stopped_dir_seen(last_role, now);
        // While etcd stays unreachable a leading primary asks for failsafe
        // confirmations before it tries etcd again (which may take the
        // whole retry timeout), so the fence guard learns of them in time.
        let leading_primary = local.running && local.role == Some(PgRole::Primary);
        let ask_failsafe = leading_primary && self.memory.etcd_failures > 0;
        if ask_failsafe {
            let confirmed = self.failsafe_round().await;
            self.failsafe_confirmed(confirmed);
        }
        self.read_sent = self.now();
        let dcs = match self.etcd.load().await {
            Ok((view, history)) => {
                if self.memory.etcd_failures > 0 {
                    info!(
                        after_failures = self.memory.etcd_failures,
                        "etcd reachable again"
                    );
                }
                self.dcs_last_seen = Some(Instant::now());
                self.history = history;
                Some(view)
            }
            Err(e) => {
                let attempt = self.memory.etcd_failures + 1;
                warn!(attempt, error = %e, "etcd unreachable");
                if leading_primary && !ask_failsafe {
                    let confirmed = self.failsafe_round().await;
                    self.failsafe_confirmed(confirmed);
                }
                None
            }
        };
        // The lease we renew must be the one the key is bound to.
        if let (Some(view), Some(lease)) = (&dcs, self.lease.held()) {
            if !ha::lease_still_ours(view, &self.cfg.name, lease.lease_id) {
                info!("leader key no longer ours");
                self.lease.release();
            }
        }
        let orphan_slots =
            self.memory
                .dcs_seen(dcs.as_ref(), self.read_sent, &self.cfg.name, &local, now);
        let (peers, live_primary) = match &dcs {
            Some(view) if self.memory.wants_peers(&local, Some(view)) => {
                let (peers, primary) = self.ask_peers(view).await;
                (Some(peers), primary)
            }
            _ => (None, None),
        };
        self.last_local = local.clone();
        Observation {
            node: self.cfg.name.clone(),
            tags: self.cfg.tags.clone(),
            data_dir,
            local,
            dcs,
            leader_lease: self.leader_lease(),
            job: self.job.as_ref().map(|j| j.kind),
            starting_standby: self.job.as_ref().is_some_and(|j| j.standby),
            pg_down_since: self.memory.pg_down_since,
            orphan_slots,
            last_role,
            replica_stalled_since: self.memory.stalled_since(),
            needs_rewind: self.memory.needs_rewind,
            rewind_failed: self.memory.rewind_failed,
            rewind_pending: self.memory.rewind_pending,
            member_waits: self.memory.member_waits().clone(),
            peers,
            region: self.cfg.region.clone(),
            wall_ms: epoch_ms(),
            handover: self.memory.handover.clone(),
            checkpoint_lsn,
            shutting_down: self.shutting_down,
            sync_applied: self.memory.sync_applied.clone(),
            failsafe_promise_until: self.failsafe.until().map(|u| self.tick_of(u)),
            live_primary,
            primary_ended_at: self.memory.primary_ended_at,
            may_bootstrap: self
                .cfg
                .cluster
                .primary_region
                .as_ref()
                .is_none_or(|p| self.cfg.region.as_ref() == Some(p)),
        }
    }

    /// Asks every other member's API for its current WAL position; members
    /// that do not answer within a second are left out. Also returns a
    /// member that answered that it runs Postgres as primary.
    async fn ask_peers(&self, view: &DcsView) -> (Vec<PeerPosition>, Option<String>) {
        let timeout = self.cfg.timing.retry_timeout.min(Duration::from_secs(1));
        let asks = view
            .members
            .iter()
            .filter(|m| m.name != self.cfg.name)
            .map(|m| {
                let (name, url) = (m.name.clone(), m.api_url.clone());
                async move {
                    let answer =
                        tokio::time::timeout(timeout, crate::ctl::get_json(&url, "/status")).await;
                    let Ok(Ok((_, v))) = answer else { return None };
                    if v["role"] == "primary" && matches!(v["state"].as_str(), Some("running")) {
                        return Some(Err(name));
                    }
                    let running_replica = v["role"] == "replica"
                        && matches!(v["state"].as_str(), Some("running" | "streaming"));
                    if !running_replica {
                        return None;
                    }
                    let lsn = |k: &str| v[k].as_str().and_then(Lsn::parse);
                    let saw_no_leader = v["cluster_leader"].is_null();
                    Some(Ok(PeerPosition {
                        saw_no_leader,
                        name,
                        timeline: v["timeline"].as_u64().map(|t| t as u32),
                        lsn: lsn("receive_lsn")
                            .max(lsn("replay_lsn"))
                            .unwrap_or_default(),
                        replay_lsn: lsn("replay_lsn").unwrap_or_default(),
                        replay_paused: v["replay_paused"].as_bool().unwrap_or(false),
                    }))
                }
            });
        let mut peers = Vec::new();
        let mut primary = None;
        for answer in futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
        {
            match answer {
                Ok(p) => peers.push(p),
                Err(name) => primary = Some(name),
            }
        }
        (peers, primary)
    }

    fn upstream(&self, name: &str) -> Option<Upstream> {
        let m = self.memory.last_view.as_ref()?.member(name)?;
        Some(Upstream {
            name: m.name.clone(),
            host: m.pg_host.clone(),
            port: m.pg_port,
        })
    }

    fn spawn_job<F, E>(&mut self, kind: Job, fut: F)
    where
        F: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: Into<JobError>,
    {
        let done = self.job_done.clone();
        let job = async move {
            let r = fut.await.map_err(Into::into);
            let _ = done.send(()).await;
            r
        };
        let handle = tokio::spawn(job.in_current_span());
        self.job = Some(RunningJob {
            kind,
            standby: false,
            handle,
        });
    }

    async fn execute(&mut self, step: Step, obs: &Observation) -> Result<(), AgentError> {
        let node = self.cfg.name.clone();
        let term = obs
            .dcs
            .as_ref()
            .and_then(|d| d.leader.as_ref())
            .map(|l| l.mod_revision)
            .unwrap_or(0);
        if matches!(step.action, Action::RenewLeader { .. }) {
            debug!(term, action = %step.action, reason = %step.reason, "step");
        } else {
            info!(term, action = %step.action, reason = %step.reason, "step");
        }
        let start_timeout = Duration::from_secs(300);
        match step.action {
            Action::Refuse { problem } => {
                error!(%problem, "refusing to run");
                return Err(AgentError::Refused(problem));
            }
            Action::ClaimInitialize { system_identifier } => {
                match self.etcd.claim_initialize(&node, system_identifier).await {
                    Ok(true) => {
                        info!("won the initialize race");
                        let seed = DynamicConfig {
                            failsafe_mode: self.cfg.cluster.failsafe_mode,
                            synchronous_mode: self.cfg.cluster.synchronous_mode,
                            synchronous_node_count: self.cfg.cluster.synchronous_node_count,
                            paused: false,
                            maximum_lag_on_failover: self.cfg.cluster.maximum_lag_on_failover,
                            primary_start_timeout_ms: self
                                .cfg
                                .cluster
                                .primary_start_timeout
                                .as_millis()
                                as u64,
                            member_slot_grace_ms: self.cfg.cluster.member_slot_grace.as_millis()
                                as u64,
                            primary_region: self.cfg.cluster.primary_region.clone(),
                            auto_reinit: self.cfg.cluster.auto_reinit,
                            parameters: Default::default(),
                        };
                        if let Err(e) = self.etcd.seed_config(&seed).await {
                            warn!(error = %e, "could not seed the dynamic config");
                        }
                    }
                    Ok(false) => info!("another node initializes the cluster"),
                    Err(e) => warn!(error = %e, "initialize race failed"),
                }
            }
            Action::InitDb
                if self.pgbackrest.is_some() && self.cfg.backup.bootstrap_from.is_some() =>
            {
                let pgbackrest = self.pgbackrest.clone().expect("guarded");
                let target = crate::backup::Target::parse(
                    self.cfg.backup.bootstrap_from.as_deref().expect("guarded"),
                );
                let pg = self.pg.clone();
                info!(term, target = ?target, "bootstrapping from the backup repository instead of initdb");
                self.spawn_job(Job::InitDb, async move {
                    let marker = begin_restore(&pg)?;
                    pgbackrest
                        .restore_for_bootstrap(&target)
                        .await
                        .map_err(|e| e.to_string())?;
                    pg.write_config(false, None).map_err(|e| e.to_string())?;
                    // The old cluster's synchronous standbys are not ours.
                    pg.write_sync_conf("").map_err(|e| e.to_string())?;
                    pg.start(start_timeout).await.map_err(|e| e.to_string())?;
                    pg.wait_out_of_recovery(BOOTSTRAP_RECOVERY_LIMIT)
                        .await
                        .map_err(|e| e.to_string())?;
                    pg.ensure_replication_role()
                        .await
                        .map_err(|e| e.to_string())?;
                    marker.finish().map_err(|e| e.to_string())
                });
            }
            Action::InitDb => {
                let pg = self.pg.clone();
                self.spawn_job(Job::InitDb, async move {
                    pg.initdb().await.map_err(|e| e.to_string())?;
                    pg.write_config(false, None).map_err(|e| e.to_string())?;
                    pg.start(start_timeout).await.map_err(|e| e.to_string())?;
                    pg.ensure_replication_role()
                        .await
                        .map_err(|e| e.to_string())
                });
            }
            Action::PublishSystemIdentifier { system_identifier } => {
                if let Err(e) = self
                    .etcd
                    .publish_system_identifier(&node, system_identifier)
                    .await
                {
                    warn!(error = %e, "could not publish the system identifier");
                }
            }
            Action::Clone { from } => {
                let Some(up) = self.upstream(&from) else {
                    return Ok(());
                };
                let pg = self.pg.clone();
                let repository = self
                    .pgbackrest
                    .clone()
                    .filter(|_| self.cfg.postgresql.clone_from == crate::config::CloneFrom::Backup);
                self.spawn_job(Job::Clone, async move {
                    if let Some(pgbackrest) = repository {
                        match clone_from_repository(&pg, &pgbackrest, &up).await {
                            Ok(()) => return Ok(()),
                            Err(e) => warn!(error = %e, "cloning from the backup repository failed: cloning from the leader with pg_basebackup"),
                        }
                    }
                    match pg.basebackup(&up).await {
                        Ok(()) => {
                            pg.write_config(true, Some(&up))
                                .map_err(|e| e.to_string())?;
                            pg.job_marker().finish().map_err(|e| e.to_string())
                        }
                        Err(e) => {
                            // The directory was empty before this clone: remove
                            // only what the failed clone wrote, so it can retry.
                            discard_partial_clone(&pg);
                            Err(e.to_string())
                        }
                    }
                });
            }
            Action::Rewind { from } => {
                let Some(up) = self.upstream(&from) else {
                    return Ok(());
                };
                let pg = self.pg.clone();
                self.spawn_job(Job::Rewind, async move {
                    pg.rewind(&up).await.map_err(|e| match e {
                        PgError::SourceUnusable(_) => JobError::Retry(e.to_string()),
                        e => JobError::Failed(e.to_string()),
                    })
                });
            }
            Action::MoveAside => {
                let dir = self.cfg.postgresql.data_dir.clone();
                let aside = dir.with_file_name(format!(
                    "{}.pgha-old-{}",
                    dir.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "data".into()),
                    crate::clock::epoch_secs()
                ));
                match std::fs::rename(&dir, &aside) {
                    Ok(()) => {
                        warn!(aside = %aside.display(), "data directory moved aside; it will be recloned");
                        if let Err(e) = self.pg.job_marker().finish() {
                            warn!(error = %e, "could not remove the rewind marker");
                        }
                        self.memory.rewind_pending = false;
                        self.memory.rewind_failed = false;
                        self.memory.needs_rewind = false;
                        self.data_dir = None;
                    }
                    Err(e) => {
                        error!(error = %e, "could not move the data directory aside")
                    }
                }
            }
            Action::StartPrimary | Action::Promote { .. } if !self.lease_ahead() => {
                // The decision was made on a lease that ran out since (a
                // slow pass, a frozen host): the next pass decides again.
                warn!(term, action = %step.action, "leader lease no longer ahead of its fencing deadline: step skipped");
                self.pass_blocked = true;
            }
            Action::StartPrimary => {
                let pg = self.pg.clone();
                self.spawn_job(Job::Start, async move {
                    pg.write_config(false, None).map_err(|e| e.to_string())?;
                    pg.start(start_timeout).await.map_err(|e| e.to_string())
                });
            }
            Action::StartReplica { upstream } => {
                let up = upstream.as_deref().and_then(|u| self.upstream(u));
                self.memory.following = up.as_ref().map(|u| u.name.clone());
                let pg = self.pg.clone();
                self.spawn_job(Job::Start, async move {
                    pg.write_config(true, up.as_ref())
                        .map_err(|e| e.to_string())?;
                    pg.start(start_timeout).await.map_err(|e| e.to_string())
                });
                if let Some(job) = self.job.as_mut() {
                    job.standby = true;
                }
            }
            Action::Follow { upstream } => {
                let Some(up) = self.upstream(&upstream) else {
                    return Ok(());
                };
                // A standby still starting takes no connection: signal it.
                let starting = self.job.as_ref().is_some_and(|j| j.standby);
                let result = match self.pg.write_config(true, Some(&up)) {
                    Ok(()) if starting => self.pg.signal_reload(),
                    Ok(()) => self.pg.reload().await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => self.memory.following = Some(upstream),
                    Err(e) => warn!(error = %e, "could not repoint replication"),
                }
            }
            Action::AcquireLeader => self.acquire_leader().await,
            // Logged above with its reason; nothing to do.
            Action::Wait => {}
            Action::RenewLeader { lease_id }
                if self.memory.abandoned_leases.contains(&lease_id) =>
            {
                warn!(term, lease_id, "the leader key is ours under a lease we revoked: not adopting it, it goes with the lease");
                self.lease.release();
                self.pass_blocked = true;
            }
            Action::RenewLeader { lease_id } => {
                // The keeper renews on its own clock; this decision keeps
                // it renewing until the next pass is due.
                let until = Instant::now() + self.renew_window();
                if !self.lease.extend(lease_id, until) {
                    // A key of ours the keeper does not hold (the agent
                    // restarted): adopted once a renewal of it succeeds.
                    let sent_at = Instant::now();
                    match self.etcd.keep_alive(lease_id).await {
                        Ok(true) => {
                            info!(term, lease_id, "adopted our leader key");
                            self.lease.hold(lease_id, sent_at, until);
                        }
                        Ok(false) => {
                            warn!(lease_id, "leader lease expired");
                            self.lease.release();
                        }
                        Err(e) => warn!(error = %e, "leader lease renewal failed"),
                    }
                }
            }
            Action::ReleaseLeader => self.release_leader().await,
            Action::HandOverKey { to } => {
                let sw = obs.dcs.as_ref().and_then(|d| d.switchover.clone());
                match (self.lease.held(), sw) {
                    (Some(lease), Some(sw)) => {
                        match self
                            .etcd
                            .hand_over_leader(&node, lease.lease_id, &sw, &to)
                            .await
                        {
                            Ok(true) => {
                                info!(term, to = %to, "leader key handed over");
                                self.lease.release();
                                self.abandon_lease(lease.lease_id).await;
                            }
                            Ok(false) => {
                                warn!(term, to = %to, "handover not recorded: the key or the switchover request changed");
                            }
                            Err(e) => {
                                warn!(term, to = %to, error = %e, "could not hand the leader key over")
                            }
                        }
                    }
                    _ => {
                        warn!(term, to = %to, "handover without a leader lease or a pending switchover")
                    }
                }
            }
            Action::ReserveTimeline { timeline } => {
                // Raised past any history file in our pg_wal: Postgres
                // would skip those numbers itself.
                let timeline = self.pg.free_timeline_from(timeline);
                let reserved = match self.lease.held() {
                    Some(lease) => self
                        .etcd
                        .reserve_timeline(&node, lease.lease_id, timeline)
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|ok| ok.then_some(()).ok_or("leader key not ours".into())),
                    None => Err("no leader lease".to_string()),
                };
                match reserved {
                    Ok(()) => {
                        info!(term, timeline, "timeline reserved for the promotion");
                        self.memory.reserved_timeline = Some(timeline);
                    }
                    Err(e) => {
                        warn!(term, timeline, error = %e, "could not reserve a timeline: not promoting");
                        self.pass_blocked = true;
                    }
                }
            }
            Action::Promote { timeline } => {
                let old_leader = self.memory.last_known_leader.clone();
                let target = self
                    .memory
                    .reserved_timeline
                    .take()
                    .filter(|r| *r >= timeline)
                    .unwrap_or(timeline);
                let current = obs.local.timeline.unwrap_or(1);
                let steered = match self.pg.steer_promotion(current, target) {
                    Ok(files) => files.len(),
                    Err(e) => {
                        warn!(term, error = %e, "could not steer the promotion's timeline: not promoting");
                        return Ok(());
                    }
                };
                if steered > 0 {
                    info!(
                        term,
                        timeline = target,
                        skipped = steered,
                        "promotion steered past timelines taken elsewhere"
                    );
                }
                // Postgres may take writes any moment now: no replica.
                self.announce(|s| s.transition = Some(Transition::Promoting));
                match self.pg.promote().await {
                    Ok(()) => {
                        self.memory.following = None;
                        self.promotions += 1;
                        // `promote` saw Postgres take writes: primary for
                        // the API now, the probe's positions a moment later.
                        let promoted = LocalPostgres {
                            role: Some(PgRole::Primary),
                            receive_lsn: None,
                            replay_lsn: None,
                            streaming_from: None,
                            following: None,
                            ..obs.local.clone()
                        };
                        self.announce_promoted(obs, &promoted);
                        // Now, not at the end of the pass: the other
                        // routers move when our member key says primary.
                        let me = self.member_status(&Observation {
                            local: promoted.clone(),
                            ..obs.clone()
                        });
                        let pg = self.pg.clone();
                        let (put, local) = tokio::join!(self.put_member(&me), pg.probe());
                        if let Err(e) = put {
                            warn!(error = %e, "could not publish member status after promotion");
                        }
                        self.announce_promoted(obs, &local);
                        self.last_local = local.clone();
                        let switchover = obs.dcs.as_ref().and_then(|d| d.switchover.as_ref());
                        let entry = HistoryEntry {
                            kind: if switchover.is_some() {
                                "switchover"
                            } else {
                                "failover"
                            }
                            .into(),
                            timeline: local.timeline,
                            lsn: local.wal_position,
                            at_ms: epoch_ms(),
                            old_leader: old_leader.filter(|o| *o != node),
                            new_leader: node.clone(),
                            reason: match switchover {
                                Some(sw) if sw.force => format!("forced failover from {}", sw.from),
                                Some(sw) => format!("switchover from {}", sw.from),
                                None => step.reason.clone(),
                            },
                        };
                        info!(term, timeline = ?local.timeline, "promoted");
                        let pg = self.pg.clone();
                        let checkpoint = async move {
                            if let Err(e) = pg.checkpoint().await {
                                warn!(error = %e, "checkpoint after promotion failed");
                            }
                        };
                        tokio::spawn(checkpoint.in_current_span());
                        if let Err(e) = self.etcd.append_history(entry).await {
                            warn!(error = %e, "could not record the promotion in history");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "promotion failed");
                        self.announce(|s| s.transition = None);
                    }
                }
            }
            Action::Stop { then_rewind } => {
                self.announce(|s| s.transition = Some(Transition::Stopping));
                let now = self.now();
                self.memory.stop_began(&obs.local, now);
                let pg = self.pg.clone();
                self.memory.following = None;
                self.memory.needs_rewind |= then_rewind;
                self.spawn_job(Job::Stop, async move {
                    pg.stop(Duration::from_secs(30))
                        .await
                        .map_err(|e| e.to_string())
                });
                self.publish_route(obs);
            }
            Action::HandoverStop { to } => {
                let force = obs
                    .dcs
                    .as_ref()
                    .and_then(|d| d.switchover.as_ref())
                    .is_some_and(|s| s.force);
                self.memory.handover = Some(Handover {
                    since: self.now(),
                    to: to.clone(),
                    force,
                });
                // Before the checkpoint: clients leave while Postgres still
                // finishes cleanly.
                self.announce(|s| s.transition = Some(Transition::Stopping));
                let now = self.now();
                self.memory.stop_began(&obs.local, now);
                let pg = self.pg.clone();
                self.memory.following = None;
                // The member key as `stopping`, put from the job before the
                // checkpoint (whose fsyncs would slow etcd's): the other
                // agents' routers, woken by their watch on a member's role
                // or state, stop sending new connections here while
                // Postgres still accepts them.
                let stopping = obs.dcs.as_ref().and(self.member_lease).map(|lease| {
                    let me = ha::member_status(obs, Some(Job::Stop), identity(&self.cfg));
                    (self.etcd.clone(), me, lease)
                });
                self.spawn_job(Job::Stop, async move {
                    if let Some((etcd, me, lease)) = stopping {
                        match tokio::time::timeout(STOPPING_PUT_BOUND, etcd.put_member(&me, lease)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::warn!(error = %e, "could not publish the stopping state before the handover"),
                            Err(_) => tracing::warn!(bound_ms = STOPPING_PUT_BOUND.as_millis() as u64, "publishing the stopping state before the handover timed out"),
                        }
                    }
                    // A checkpoint first keeps the shutdown checkpoint, during
                    // which no write is possible, short; it overlaps the time
                    // the other agents need to see the key.
                    let (checkpoint, ()) =
                        tokio::join!(pg.checkpoint(), tokio::time::sleep(ROUTERS_SEE_KEY));
                    if let Err(e) = checkpoint {
                        tracing::warn!(error = %e, to = %to, "checkpoint before handover failed");
                    }
                    pg.stop(Duration::from_secs(30))
                        .await
                        .map_err(|e| e.to_string())
                });
                // Our router stops sending writers here as the stop begins.
                self.publish_route(obs);
            }
            Action::SetSyncStandbys { set } => match self.pg.set_sync_standbys(&set).await {
                Ok(()) => {
                    info!(term, standbys = %set, reason = %step.reason, "synchronous standbys set");
                    self.memory.sync_applied = Some(SyncApplied {
                        set,
                        at: self.now(),
                        mark: None,
                    });
                }
                Err(e) => {
                    warn!(term, error = %e, "could not set synchronous standbys");
                    self.pass_blocked = true;
                }
            },
            Action::PublishSync { set } => {
                let published = match self.lease.held() {
                    Some(lease) => self
                        .etcd
                        .publish_sync(&node, lease.lease_id, &set)
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|ok| ok.then_some(()).ok_or("leader key not ours".into())),
                    None => Err("no leader lease".to_string()),
                };
                match published {
                    Ok(()) => {
                        info!(term, sync = %set, reason = %step.reason, "sync key published")
                    }
                    Err(e) => {
                        warn!(term, error = %e, "could not publish the sync key");
                        self.pass_blocked = true;
                    }
                }
            }
            Action::DeleteSync => {
                if let Some(lease) = self.lease.held() {
                    if let Err(e) = self.etcd.delete_sync(&node, lease.lease_id).await {
                        warn!(term, error = %e, "could not delete the sync key");
                    }
                }
            }
            Action::ClearSwitchover => {
                if let Err(e) = self.etcd.clear_switchover().await {
                    warn!(error = %e, "could not clear the switchover request");
                }
            }
            Action::CreateSlots { names } => {
                for name in names {
                    if let Err(e) = self.pg.create_slot(&name).await {
                        warn!(slot = %name, error = %e, "could not create slot");
                    }
                }
            }
            Action::DropSlots { names } => {
                for name in names {
                    if let Err(e) = self.pg.drop_slot(&name).await {
                        warn!(slot = %name, error = %e, "could not drop slot");
                    }
                }
            }
        }
        Ok(())
    }

    async fn acquire_leader(&mut self) {
        let node = self.cfg.name.clone();
        let sent_at = Instant::now();
        let lease_id = match self.etcd.grant_lease(self.cfg.timing.ttl).await {
            Ok(id) => id,
            Err(e) => {
                warn!(error = %e, "could not grant a leader lease");
                return;
            }
        };
        match self.etcd.acquire_leader(&node, lease_id).await {
            Ok(true) => {
                info!(lease_id, "acquired the leader key");
                self.lease
                    .hold(lease_id, sent_at, Instant::now() + self.renew_window());
                self.announce(|s| s.leader = Some(node));
            }
            Ok(false) => {
                info!("another node took the leader key first");
                self.abandon_lease(lease_id).await;
            }
            Err(e) => {
                warn!(error = %e, "leader key acquisition failed");
                self.abandon_lease(lease_id).await;
            }
        }
    }

    /// Revokes a leader lease we gave up on. The revocation may land late
    /// (a slow etcd answers after our timeout): until then a key created
    /// under it (an acquisition that went through after all) must not be
    /// adopted, or it would vanish under a promoted primary.
    async fn abandon_lease(&mut self, lease_id: i64) {
        const REMEMBERED: usize = 16;
        if self.memory.abandoned_leases.len() >= REMEMBERED {
            self.memory.abandoned_leases.remove(0);
        }
        self.memory.abandoned_leases.push(lease_id);
        let _ = self.etcd.revoke_lease(lease_id).await;
    }

    async fn release_leader(&mut self) {
        let node = self.cfg.name.clone();
        self.announce(|s| {
            s.transition = s.transition.or(Some(Transition::SteppingDown));
        });
        let lease_id = self.lease.held().map(|l| l.lease_id).or_else(|| {
            self.memory
                .last_view
                .as_ref()?
                .leader
                .as_ref()
                .filter(|k| k.name == node)
                .map(|k| k.lease_id)
        });
        if let Some(id) = lease_id {
            match self.etcd.release_leader(&node, id).await {
                Ok(true) => info!("released the leader key"),
                Ok(false) => info!("leader key was no longer ours"),
                Err(e) => warn!(error = %e, "could not release the leader key"),
            }
            self.abandon_lease(id).await;
        }
        self.lease.release();
    }

    /// The promotion is done and `local` confirms it: this node is the
    /// primary for the API at once, not after the next pass.
    fn announce_promoted(&self, obs: &Observation, local: &LocalPostgres) {
        let promoted = Observation {
            local: local.clone(),
            ..obs.clone()
        };
        let me = self.member_status(&promoted);
        let node = self.cfg.name.clone();
        let term = obs
            .dcs
            .as_ref()
            .and_then(|d| d.leader.as_ref())
            .map(|l| l.mod_revision);
        self.announce(|s| {
            s.transition = None;
            s.leader = Some(node);
            s.leader_revision = term.or(s.leader_revision);
            s.promotions = self.promotions;
            if let Some(m) = s.members.iter_mut().find(|m| m.name == me.name) {
                *m = me.clone();
            }
            s.me = me;
        });
    }

    fn member_status(&self, obs: &Observation) -> MemberStatus {
        let identity = MemberStatus {
            basebackup: *self.pg.clone_progress.lock().expect("not poisoned"),
            ..identity(&self.cfg)
        };
        ha::member_status(obs, self.job.as_ref().map(|j| j.kind), identity)
    }

    /// Publishes this member's status in etcd and the snapshot for the API.
    async fn publish(&mut self, obs: &Observation) {
        let me = self.member_status(obs);
        if obs.dcs.is_some() {
            // Side by side: every round trip of a pass delays the next lease
            // renewal, and on a slow link they add up.
            let etcd = self.etcd.clone();
            let name = self.cfg.name.clone();
            let leader_lease = self.lease.held();
            let leader_status = async {
                if let (Some(lease), Some(PgRole::Primary), Some(lsn)) =
                    (leader_lease, obs.local.role, obs.local.wal_position)
                {
                    if let Err(e) = etcd
                        .publish_leader_status(&name, lease.lease_id, lsn, obs.local.timeline)
                        .await
                    {
                        debug!(error = %e, "could not publish leader status");
                    }
                }
            };
            let (member, ()) = tokio::join!(self.put_member(&me), leader_status);
            if let Err(e) = member {
                warn!(error = %e, "could not publish member status");
            }
        }
        let view = obs.dcs.as_ref().or(self.memory.last_view.as_ref());
        let mut members: Vec<MemberStatus> = view.map(|v| v.members.clone()).unwrap_or_default();
        match members.iter_mut().find(|m| m.name == me.name) {
            Some(m) => *m = me.clone(),
            None => members.push(me.clone()),
        }
        members.sort_by(|a, b| a.name.cmp(&b.name));
        let taken_at = Instant::now();
        let lease = self.lease.held();
        let fence_window = Duration::from_millis(self.settings.fence_window_ms());
        let snapshot = Snapshot {
            taken_at,
            scope: self.cfg.scope.clone(),
            me,
            leader: view.and_then(|v| v.leader.as_ref()).map(|l| l.name.clone()),
            leader_revision: view.and_then(|v| v.leader.as_ref()).map(|l| l.mod_revision),
            members,
            history: self.history.clone(),
            config: view.map(|v| v.config.clone()),
            dcs_reachable: obs.dcs.is_some(),
            dcs_last_seen: self.dcs_last_seen,
            lease_remaining: remaining(lease, self.cfg.timing.ttl, taken_at),
            fencing_remaining: remaining(lease, fence_window, taken_at),
            pending_restart: obs.local.pending_restart,
            paused: view.is_some_and(|v| v.config.paused),
            sync: view.and_then(|v| v.sync.clone()),
            switchover: view.and_then(|v| v.switchover.clone()),
            sync_standbys: (obs.local.role == Some(PgRole::Primary))
                .then(|| obs.local.sync_standbys.clone())
                .flatten(),
            promotions: self.promotions,
            loop_durations: self.loop_durations.clone(),
            last_error: self.last_error.clone(),
            route: self.cfg.router.enabled.then(|| self.route.clone()),
            // A stopping agent never leads again; the other changes are
            // over by the end of the pass that began them (a stop under
            // way shows as the state `stopping`).
            transition: self.shutting_down.then_some(Transition::SteppingDown),
        };
        self.snapshot.send_replace(Arc::new(snapshot));
    }

    async fn put_member(&mut self, me: &MemberStatus) -> Result<(), crate::dcs::DcsError> {
        if let Some(id) = self.member_lease {
            // The keepalive and the put go out together (one round trip);
            // a put under a lease that turns out gone is done again below.
            let (alive, put) = tokio::join!(self.etcd.keep_alive(id), self.etcd.put_member(me, id));
            if alive? {
                return put;
            }
            self.member_lease = None;
        }
        let id = match self.member_lease {
            Some(id) => id,
            None => {
                let id = self.etcd.grant_lease(self.cfg.timing.ttl).await?;
                self.member_lease = Some(id);
                id
            }
        };
        self.etcd.put_member(me, id).await
    }

    /// Reads the marker of a rewind or clone that did not finish (the agent
    /// stopped or died during it). A partial clone, written by us into an
    /// empty directory, is removed so that the clone starts over; a partial
    /// rewind keeps the directory from starting until a rewind succeeds.
    async fn check_job_marker(&mut self) {
        let marker = self.pg.job_marker();
        let found = match marker.read() {
            Ok(found) => found,
            Err(e) => {
                warn!(marker = %marker.path().display(), error = %e, "cannot read the job marker: treated as an unfinished rewind");
                Some(Unfinished::Rewind)
            }
        };
        let was_pending = self.memory.rewind_pending;
        self.memory.rewind_pending = found == Some(Unfinished::Rewind);
        if self.memory.rewind_pending && !was_pending {
            warn!(marker = %marker.path().display(), "the last pg_rewind did not finish: Postgres stays down until a rewind against the leader succeeds (published as rewind_pending)");
        }
        if found == Some(Unfinished::Clone) {
            let dir = &self.cfg.postgresql.data_dir;
            warn!(dir = %dir.display(), "an interrupted clone left a partial copy: removing what it wrote and cloning again");
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    error!(error = %e, "could not remove the partial clone");
                    return;
                }
            }
            if let Err(e) = marker.finish() {
                error!(error = %e, "could not remove the clone marker");
            }
            self.data_dir = None;
        }
    }

    /// Stops Postgres, gives up the leader key and the member key.
    async fn shut_down(&mut self) {
        let node = self.cfg.name.clone();
        info!("shutting down");
        if let Some(mut job) = self.job.take() {
            if matches!(job.kind, Job::Rewind | Job::Clone) {
                // Cut short, either leaves a directory that must not start
                // as it is (the marker says so on the next start); finished,
                // the node rejoins at once next time.
                let wait = self.cfg.timing.shutdown_timeout;
                info!(job = ?job.kind, wait_ms = wait.as_millis() as u64, "stopping: waiting for the running job to finish");
                match tokio::time::timeout(wait, &mut job.handle).await {
                    Ok(Ok(Ok(()))) => {
                        info!(job = ?job.kind, "stopping: the job finished")
                    }
                    Ok(Ok(Err(e))) => {
                        warn!(job = ?job.kind, error = %e, "stopping: the job failed; the next start repairs the data directory")
                    }
                    Ok(Err(e)) => {
                        warn!(job = ?job.kind, error = %e, "stopping: the job panicked")
                    }
                    Err(_) => {
                        warn!(job = ?job.kind, "stopping: the job did not finish within shutdown_timeout: cancelled; the next start repairs the data directory")
                    }
                }
            }
            job.handle.abort();
        }
        self.announce(|s| s.transition = Some(Transition::Stopping));
        if let Err(e) = self.pg.stop(Duration::from_secs(30)).await {
            warn!(error = %e, "stopping postgres failed");
        }
        if self.lease.held().is_some() {
            self.release_leader().await;
        }
        if let Some(id) = self.member_lease.take() {
            let _ = self.etcd.delete_member(&node).await;
            let _ = self.etcd.revoke_lease(id).await;
        }
        // Disarms and ends the guard: Postgres is already stopped.
        self.lease.stop();
        info!("stopped");
    }
}

/// Wakes the loop on every change under the cluster prefix; reconnects.
async fn watch_cluster(etcd: Etcd, wake: mpsc::Sender<()>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = etcd.watch(0, wake.clone()) => {
                if let Err(e) = r {
                    debug!(error = %e, "etcd watch ended");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
