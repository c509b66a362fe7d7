//! `decide(observation, settings, now) -> steps`: the whole HA policy of one
//! node as a pure function. The agent and the tests call the same code.

use super::action::{Action, Step};
use super::settings::{lease_proven, Settings};
use super::state::*;

/// Name of the physical replication slot the primary keeps for a member.
pub fn slot_name(member: &str) -> String {
    member
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Decides what this node does now. Steps run in the order returned.
pub fn decide(obs: &Observation, settings: &Settings, now: Tick) -> Vec<Step> {
    let mut steps = Vec::new();
    let fence_due = is_fence_due(obs, settings, now);
    let running_primary = obs.local.running && obs.local.role == Some(PgRole::Primary);

    if running_primary && fence_due {
        steps.push(Step::new(
            Action::Stop { then_rewind: false },
            "fencing: leader lease not renewed before the fencing deadline; stop taking writes",
        ));
        return steps;
    }

    let Some(dcs) = &obs.dcs else {
        if running_primary && obs.leader_lease.is_none() {
            steps.push(Step::new(Action::Stop { then_rewind: false }, "etcd unreachable and no leader lease held: a primary without a lease must not take writes"));
        } else if let Some(lease) = obs.leader_lease {
            steps.push(Step::new(
                Action::RenewLeader {
                    lease_id: lease.lease_id,
                },
                "etcd unreachable: keep trying to renew before the fencing deadline",
            ));
        }
        return steps;
    };

    let i_lead = dcs.leader.as_ref().is_some_and(|l| l.name == obs.node);
    if i_lead {
        let key = dcs.leader.as_ref().expect("checked above");
        steps.push(Step::new(
            Action::RenewLeader {
                lease_id: key.lease_id,
            },
            "we hold the leader key",
        ));
    }
    if obs.job.is_some() {
        if let Some(step) = repoint_starting_standby(obs, dcs) {
            steps.push(step);
        }
        return steps;
    }

    // Bootstrap and identity: nothing else happens until the data directory
    // is known to belong to this cluster.
    let Some(init) = &dcs.initialize else {
        if !obs.may_bootstrap {
            return steps;
        }
        let claim = match obs.data_dir {
            DataDir::Empty => Action::ClaimInitialize {
                system_identifier: None,
            },
            DataDir::Initialized { system_identifier } => Action::ClaimInitialize {
                system_identifier: Some(system_identifier),
            },
            DataDir::Unusable => return refuse_unusable(steps),
        };
        steps.push(Step::new(
            claim,
            "cluster not initialized in etcd: race for the initialize key",
        ));
        return steps;
    };
    let Some(cluster_sysid) = init.system_identifier else {
        if init.node == obs.node {
            match obs.data_dir {
                DataDir::Empty => {
                    steps.push(Step::new(Action::InitDb, "we won the initialize race"))
                }
                DataDir::Initialized { system_identifier } => steps.push(Step::new(
                    Action::PublishSystemIdentifier { system_identifier },
                    "initdb done: publish the system identifier",
                )),
                DataDir::Unusable => return refuse_unusable(steps),
            }
        }
        return steps;
    };
    match obs.data_dir {
        DataDir::Unusable => return refuse_unusable(steps),
        DataDir::Initialized { system_identifier } if system_identifier != cluster_sysid => {
            steps.push(Step::new(
                Action::Refuse {
                    problem: format!(
                        "data directory belongs to another cluster: system identifier {system_identifier}, cluster {cluster_sysid}"
                    ),
                },
                "foreign data directory is never started or overwritten",
            ));
            return steps;
        }
        DataDir::Empty => {
            if let Some(leader) = running_leader(dcs, &obs.node) {
                steps.push(Step::new(
                    Action::Clone {
                        from: leader.to_string(),
                    },
                    "empty data directory: clone the leader",
                ));
            }
            return steps;
        }
        DataDir::Initialized { .. } => {}
    }

    match &dcs.leader {
        Some(key) if key.name == obs.node => lead(obs, dcs, settings, now, &mut steps),
        Some(key) => follow(obs, dcs, settings, now, &key.name, &mut steps),
        None => elect(obs, dcs, settings, now, &mut steps),
    }
    steps
}

fn refuse_unusable(mut steps: Vec<Step>) -> Vec<Step> {
    steps.push(Step::new(
        Action::Refuse {
            problem: "data directory is not empty and holds no Postgres cluster".into(),
        },
        "an unknown data directory is never overwritten",
    ));
    steps
}

fn is_fence_due(obs: &Observation, settings: &Settings, now: Tick) -> bool {
    match obs.leader_lease {
        Some(lease) => now >= settings.fencing_deadline(lease.renewed_at),
        None => false,
    }
}

/// The leader, when its member key says its Postgres runs as primary.
fn running_leader<'a>(dcs: &'a DcsView, me: &str) -> Option<&'a str> {
    let key = dcs.leader.as_ref()?;
    let member = dcs.member(&key.name)?;
    (key.name != me && member.role == MemberRole::Primary && member.state == "running")
        .then_some(key.name.as_str())
}

/// A standby whose start is still waiting (for WAL it needs to become
/// consistent) while another member leads with its Postgres running: point
/// it at that leader now. The start would otherwise wait for WAL from an
/// upstream it does not have (it started while no leader ran) or that no
/// longer leads, until the start timeout; Postgres rereads
/// `primary_conninfo` on a reload, also before it accepts connections.
fn repoint_starting_standby(obs: &Observation, dcs: &DcsView) -> Option<Step> {
    if obs.job != Some(Job::Start) || !obs.starting_standby || obs.shutting_down {
        return None;
    }
    let leader = running_leader(dcs, &obs.node)?;
    if obs.local.following.as_deref() == Some(leader) {
        return None;
    }
    Some(Step::new(
        Action::Follow {
            upstream: leader.to_string(),
        },
        match &obs.local.following {
            Some(old) => {
                format!("standby still starting: {leader} leads now, not {old}: stream from it")
            }
            None => format!(
                "standby still starting without an upstream: stream from {leader}, which leads"
            ),
        },
    ))
}

/// The timeline a promotion of ours takes: above every timeline the
/// cluster has seen, by etcd (the reservation, the leader's status, the
/// history), the members and our peers' answers. A reservation of ours
/// above all of them (an earlier pass that did not get to promote) is
/// taken again rather than skipped.
fn promotion_timeline(obs: &Observation, dcs: &DcsView) -> u32 {
    let known = dcs
        .members
        .iter()
        .filter_map(|m| m.timeline)
        .chain(obs.peers.iter().flatten().filter_map(|p| p.timeline))
        .chain(obs.local.timeline)
        .chain(dcs.newest_timeline)
        .max()
        .unwrap_or(1);
    match &dcs.timeline {
        Some(k) if k.by == obs.node && k.timeline > known => k.timeline,
        Some(k) => known.max(k.timeline) + 1,
        None => known + 1,
    }
}

/// We hold the leader key.
fn lead(obs: &Observation, dcs: &DcsView, settings: &Settings, now: Tick, steps: &mut Vec<Step>) {
    let local = &obs.local;
    if super::handover::lead(obs, dcs, settings, now, steps) {
        return;
    }
    if !local.running {
        if obs.rewind_pending {
            steps.push(Step::new(
                Action::ReleaseLeader,
                "the data directory holds an unfinished rewind: it cannot run as primary",
            ));
            return;
        }
        if dcs.config.paused || obs.shutting_down {
            // Maintenance: an operator may have stopped Postgres on purpose.
            return;
        }
        let down_ms = obs.pg_down_since.map(|t| now.since(t)).unwrap_or(0);
        if down_ms >= dcs.config.primary_start_timeout_ms && obs.pg_down_since.is_some() {
            steps.push(Step::new(
                Action::ReleaseLeader,
                format!("postgres down for {down_ms} ms, past primary_start_timeout: hand leadership to a replica"),
            ));
        } else if obs.last_role == Some(PgRole::Replica) {
            // We took the key and stopped before promoting. Started as a
            // primary, a standby's data directory would only crash-recover
            // from its last restartpoint on that restartpoint's timeline,
            // dropping every later timeline and WAL it holds (acknowledged
            // commits included). As a standby it replays all of it first;
            // the next pass promotes it.
            steps.push(Step::new(
                Action::StartReplica { upstream: None },
                "we hold the leader key but the stopped data directory is a standby's (we stopped before promoting): start it as a standby, then promote",
            ));
        } else if lease_proven(obs, settings, now) {
            steps.push(Step::new(
                Action::StartPrimary,
                "we hold the leader key and postgres is down: start it as primary",
            ));
        }
        return;
    }
    if local.role == Some(PgRole::Replica) && !lease_proven(obs, settings, now) {
        return;
    }
    let wanted: Vec<String> = dcs
        .members
        .iter()
        .filter(|m| m.name != obs.node)
        .map(|m| slot_name(&m.name))
        .collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|s| !local.slots.contains(s))
        .cloned()
        .collect();
    if !missing.is_empty() {
        // Before a promotion too: the replicas repoint at once and must find their slots.
        steps.push(Step::new(
            Action::CreateSlots { names: missing },
            "every member gets a physical replication slot",
        ));
    }
    if local.role == Some(PgRole::Replica) {
        super::sync::before_promote(obs, dcs, steps);
        let timeline = promotion_timeline(obs, dcs);
        steps.push(Step::new(
            Action::ReserveTimeline { timeline },
            "before promoting: no later promotion may pick our new timeline's number",
        ));
        steps.push(Step::new(
            Action::Promote { timeline },
            "we hold the leader key: promote",
        ));
        return;
    }
    super::sync::manage(obs, dcs, steps);
    let expired: Vec<String> = obs
        .orphan_slots
        .iter()
        .filter(|s| {
            !wanted.contains(&s.name)
                && now.since(s.missing_since) >= dcs.config.member_slot_grace_ms
        })
        .map(|s| s.name.clone())
        .collect();
    if !expired.is_empty() {
        steps.push(Step::new(
            Action::DropSlots { names: expired },
            "member gone from etcd longer than member_slot_grace",
        ));
    }
}

/// Another node holds the leader key.
fn follow(
    obs: &Observation,
    dcs: &DcsView,
    settings: &Settings,
    now: Tick,
    leader: &str,
    steps: &mut Vec<Step>,
) {
    let local = &obs.local;
    if obs.shutting_down {
        return;
    }
    if local.running {
        match local.role {
            Some(PgRole::Primary) => steps.push(Step::new(
                Action::Stop { then_rewind: false },
                format!("{leader} holds the leader key: a second primary must not run"),
            )),
            _ if local.following.as_deref() != Some(leader) => steps.push(Step::new(
                Action::Follow {
                    upstream: leader.to_string(),
                },
                format!("{leader} is the leader"),
            )),
            _ => {
                let leader_tl = dcs.member(leader).and_then(|m| m.timeline);
                let stalled_ms = obs.replica_stalled_since.map(|t| now.since(t));
                if let (Some(stalled_ms), Some(leader_tl)) = (stalled_ms, leader_tl) {
                    if stalled_ms >= settings.rewind_after_ms
                        && local.timeline.is_some_and(|t| t < leader_tl)
                    {
                        steps.push(Step::new(
                            Action::Stop { then_rewind: true },
                            format!("not streaming from {leader} (timeline {leader_tl}) for {stalled_ms} ms: our timeline diverged, rewind"),
                        ));
                    }
                }
            }
        }
        return;
    }
    if dcs.config.paused || obs.shutting_down {
        return;
    }
    if let Some(at) = obs.primary_ended_at {
        let since = now.since(at);
        if since < settings.balancer_window_ms {
            steps.push(Step::new(
                Action::Wait,
                format!(
                    "stopped as primary {since} ms ago: Postgres stays down for {} ms (api.balancer_window) so a load balancer polling /primary takes us out before we accept read-only clients",
                    settings.balancer_window_ms
                ),
            ));
            return;
        }
    }
    let leader_up = running_leader(dcs, &obs.node).is_some();
    if obs.handover.as_ref().is_some_and(|h| !h.force)
        && obs.last_role == Some(PgRole::Primary)
        && !obs.rewind_pending
    {
        // We handed over cleanly: the new leader has all our WAL, no rewind.
        if leader_up {
            steps.push(Step::new(
                Action::StartReplica {
                    upstream: Some(leader.to_string()),
                },
                format!("handed over to {leader}: follow it"),
            ));
        }
        return;
    }
    if obs.last_role == Some(PgRole::Primary) || obs.needs_rewind || obs.rewind_pending {
        if obs.rewind_failed {
            if dcs.config.auto_reinit && leader_up {
                steps.push(Step::new(
                    Action::MoveAside,
                    "pg_rewind failed and auto_reinit is on: reclone from the leader",
                ));
            }
            return;
        }
        if leader_up {
            let why = if obs.rewind_pending {
                format!("an interrupted rewind left the data directory unusable: finish it against {leader}")
            } else {
                format!("rejoining {leader}: rewind any diverged WAL first")
            };
            steps.push(Step::new(
                Action::Rewind {
                    from: leader.to_string(),
                },
                why,
            ));
        } else if obs.rewind_pending {
            steps.push(Step::new(
                Action::Wait,
                format!("an interrupted rewind must finish before Postgres starts: waiting for {leader}'s Postgres to run"),
            ));
        }
        return;
    }
    let upstream = leader_up.then(|| leader.to_string());
    steps.push(Step::new(
        Action::StartReplica { upstream },
        format!("{leader} is the leader: run as its replica"),
    ));
}

/// No node holds the leader key.
fn elect(obs: &Observation, dcs: &DcsView, settings: &Settings, now: Tick, steps: &mut Vec<Step>) {
    let local = &obs.local;
    // A handover nobody completed (the switchover named no target and the
    // claim promotes nobody else, or the target died) must not keep the old
    // leader, which holds every commit, out of the election for good: it
    // released the key within handover_timeout, the target had a ttl more.
    let stale_after = settings.handover_timeout_ms + settings.ttl_ms;
    let handing_over = obs
        .handover
        .as_ref()
        .is_some_and(|h| now.since(h.since) < stale_after);
    if obs.shutting_down || handing_over {
        return;
    }
    let running_primary = local.running && local.role == Some(PgRole::Primary);
    if !running_primary && obs.failsafe_promise_until.is_some_and(|until| now < until) {
        // We confirmed the leader in failsafe mode: it may still take writes.
        return;
    }
    if let Some(decided) = super::handover::elect(obs, dcs, settings) {
        steps.extend(decided);
        return;
    }
    if dcs.config.paused {
        return;
    }
    if !local.running {
        if obs.rewind_pending {
            // Started, a half-rewound directory waits for WAL that only a
            // primary can send, and reports no position: not a candidate,
            // and published as `rewind_pending` so that nobody waits for it.
            steps.push(Step::new(
                Action::Wait,
                "no leader, and an interrupted rewind must finish before Postgres starts: not a candidate",
            ));
            return;
        }
        steps.push(Step::new(
            Action::StartReplica { upstream: None },
            "no leader: start read-only to report our WAL position",
        ));
        return;
    }
    match local.role {
        Some(PgRole::Primary) => match super::sync::candidacy(obs, dcs) {
            // Every new leader publishes its own claim before it promotes:
            // a claim by another member means someone led after us.
            Some(Err(why)) => steps.push(Step::new(
                Action::Stop { then_rewind: false },
                format!("no leader, and the sync key shows another leader since ours: {why}; a stale primary must not take writes"),
            )),
            _ => steps.push(Step::new(
                Action::AcquireLeader,
                "no leader and we run the primary: take the key back",
            )),
        },
        _ => match candidacy(obs, dcs, now) {
            Ok(why) => steps.push(Step::new(Action::AcquireLeader, why)),
            Err(why) => steps.push(Step::new(
                Action::Wait,
                format!("no leader, not a candidate: {why}"),
            )),
        },
    }
}

/// Whether this replica may take the leader key now (the reason to), and
/// if not why. Every wait here is bounded: a member without a WAL position
/// is waited for at most `primary_start_timeout`; the others are answered
/// by the member itself (tags, replay) or by the sync claim, whose own
/// waits are bounded in `sync::candidacy`.
pub fn candidacy(obs: &Observation, dcs: &DcsView, now: Tick) -> Result<String, String> {
    if obs.tags.nofailover {
        return Err("tagged nofailover".into());
    }
    let in_region = |r: &Option<String>| candidacy_region_ok(dcs, r);
    if !in_region(&obs.region) {
        return Err("outside primary_region".into());
    }
    if let Some(primary) = obs.live_primary.as_ref().filter(|p| **p != obs.node) {
        return Err(format!(
            "{primary} still runs a primary: it takes the leader key back"
        ));
    }
    if obs.rewind_pending {
        return Err("the data directory holds an unfinished rewind".into());
    }
    if obs.local.replay_paused {
        return Err("WAL replay is paused: resume it to make this node a candidate".into());
    }
    if let Some(proof) = super::sync::candidacy(obs, dcs) {
        return proof.map(|()| {
            "leader key gone and the sync claim lets us take over without losing an acknowledged commit".to_string()
        });
    }
    let mine = position(&obs.local);
    // Lag counts what is replayed: WAL received but not replayed (replay
    // paused, a slow apply) would all have to be applied before promotion.
    if let Some(last) = dcs.last_leader_lsn {
        let replayed = obs
            .local
            .replay_lsn
            .or(obs.local.wal_position)
            .unwrap_or_default();
        let lag = last.0.saturating_sub(replayed.0);
        if lag > dcs.config.maximum_lag_on_failover {
            return Err(format!(
                "{lag} bytes behind the last leader position, above maximum_lag_on_failover"
            ));
        }
    }
    // Positions compare only on the same timeline: a newer timeline wins.
    let me = (
        obs.local.timeline.unwrap_or(0),
        mine,
        obs.tags.failover_priority,
    );
    let mut passed_over = Vec::new();
    for m in &dcs.members {
        if m.name == obs.node || m.nofailover || !in_region(&m.region) {
            continue;
        }
        if m.state == "starting" {
            // It may be the most advanced; but a standby that waits for a
            // primary to become consistent never reports a position, and
            // waiting for it for good leaves the cluster without one.
            let waited = obs.member_waits.waited_ms(&m.name, now);
            let bound = dcs.config.primary_start_timeout_ms;
            if waited < bound {
                return Err(format!(
                    "{} is starting: wait until it reports its WAL position ({waited} of {bound} ms, primary_start_timeout)",
                    m.name
                ));
            }
            passed_over.push(format!(
                "{} starting for {waited} ms without a WAL position (primary_start_timeout {bound} ms)",
                m.name
            ));
            continue;
        }
        let (timeline, lsn, replayed, paused) = match &obs.peers {
            // Live answers win; a member whose API did not answer is ignored.
            Some(peers) => match peers.iter().find(|p| p.name == m.name) {
                Some(p) => (p.timeline, p.lsn, p.replay_lsn, p.replay_paused),
                None => continue,
            },
            None => {
                if !matches!(m.state.as_str(), "running" | "streaming")
                    || m.role != MemberRole::Replica
                {
                    continue;
                }
                (
                    m.timeline,
                    m.receive_lsn.max(m.replay_lsn).unwrap_or_default(),
                    m.replay_lsn.unwrap_or_default(),
                    m.replay_paused,
                )
            }
        };
        // Nor does one whose replay is paused (it refuses, see above).
        if paused {
            continue;
        }
        // A member that may not lead itself (replay too far behind) must
        // not keep the others from leading.
        if dcs.last_leader_lsn.is_some_and(|last| {
            last.0.saturating_sub(replayed.0) > dcs.config.maximum_lag_on_failover
        }) {
            continue;
        }
        let theirs = (timeline.unwrap_or(0), lsn, m.failover_priority);
        if theirs > me || (theirs == me && m.name < obs.node) {
            return Err(format!("{} is a better candidate", m.name));
        }
    }
    let mut why = "leader key gone and we are the most advanced eligible replica".to_string();
    if !passed_over.is_empty() {
        why += &format!("; no longer waiting for {}", passed_over.join(", "));
    }
    Ok(why)
}

fn position(local: &LocalPostgres) -> Lsn {
    local
        .receive_lsn
        .max(local.replay_lsn)
        .or(local.wal_position)
        .unwrap_or_default()
}
