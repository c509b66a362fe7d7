//! Planned changes of leader (switchover, graceful shutdown of a leader):
//! the leader checkpoints and stops its Postgres, waits until its target has
//! received every byte up to the shutdown checkpoint, then releases the key;
//! the target takes it and promotes; the old leader follows without rewind.

use super::action::{Action, Step};
use super::settings::{lease_proven, Settings};
use super::state::*;

/// Members that may take over from the current leader now, best first.
fn healthy_replicas<'a>(obs: &Observation, dcs: &'a DcsView) -> Vec<&'a MemberStatus> {
    let top = dcs
        .member(&obs.node)
        .and_then(|m| m.wal_position)
        .or(obs.local.wal_position)
        .unwrap_or_default();
    healthy_replicas_of(&obs.node, top, dcs)
}

/// Replicas of `leader` (whose WAL is at `top`) that may take over, best first.
pub fn healthy_replicas_of<'a>(leader: &str, top: Lsn, dcs: &'a DcsView) -> Vec<&'a MemberStatus> {
    let mut healthy: Vec<&MemberStatus> = dcs
        .members
        .iter()
        .filter(|m| m.name != leader && m.role == MemberRole::Replica && m.state == "streaming")
        .filter(|m| !m.nofailover && candidacy_region_ok(dcs, &m.region))
        .filter(|m| {
            let replayed = m.replay_lsn.unwrap_or_default();
            top.0.saturating_sub(replayed.0) <= dcs.config.maximum_lag_on_failover
        })
        .collect();
    healthy.sort_by(|a, b| {
        let key = |m: &MemberStatus| {
            (
                m.timeline,
                m.receive_lsn.max(m.replay_lsn),
                m.failover_priority,
            )
        };
        key(b).cmp(&key(a)).then_with(|| a.name.cmp(&b.name))
    });
    healthy
}

/// Whom a switchover hands over to, or why it cannot happen.
pub fn target(obs: &Observation, dcs: &DcsView, sw: &SwitchoverKey) -> Result<String, String> {
    if sw.force {
        let to = sw
            .to
            .clone()
            .ok_or("a forced failover names its candidate")?;
        return match dcs.member(&to) {
            Some(m)
                if m.role == MemberRole::Replica
                    && matches!(m.state.as_str(), "running" | "streaming") =>
            {
                Ok(to)
            }
            _ => Err(format!("{to} is not a running replica")),
        };
    }
    let healthy = healthy_replicas(obs, dcs);
    match &sw.to {
        Some(to) => {
            if healthy.iter().any(|m| &m.name == to) {
                Ok(to.clone())
            } else {
                Err(format!(
                    "{to} is not a healthy streaming replica eligible for promotion"
                ))
            }
        }
        None => healthy
            .first()
            .map(|m| m.name.clone())
            .ok_or_else(|| "no healthy streaming replica to hand over to".into()),
    }
}

fn due(obs: &Observation, sw: &SwitchoverKey) -> bool {
    sw.at_ms.is_none_or(|at| at <= obs.wall_ms)
}

/// Leader side; true when it decided everything for this pass.
pub fn lead(
    obs: &Observation,
    dcs: &DcsView,
    settings: &Settings,
    now: Tick,
    steps: &mut Vec<Step>,
) -> bool {
    let local = &obs.local;
    let running_primary = local.running && local.role == Some(PgRole::Primary);
    let Some(sw) = &dcs.switchover else {
        return false;
    };
    if sw.from != obs.node {
        if running_primary {
            steps.push(Step::new(
                Action::ClearSwitchover,
                format!("switchover from {} done: we lead", sw.from),
            ));
        }
        return false;
    }
    if !due(obs, sw) {
        return false;
    }
    let Some(handover) = &obs.handover else {
        if !running_primary {
            steps.push(Step::new(
                Action::ClearSwitchover,
                "switchover aborted: our postgres is not running as primary",
            ));
            return true;
        }
        match target(obs, dcs, sw) {
            Ok(to) => steps.push(Step::new(
                Action::HandoverStop { to: to.clone() },
                format!("switchover to {to}: checkpoint and stop so it receives all WAL"),
            )),
            Err(why) => steps.push(Step::new(
                Action::ClearSwitchover,
                format!("switchover aborted: {why}"),
            )),
        }
        return true;
    };
    if local.running {
        return true;
    }
    // The target was chosen while it streamed; now that we are down it
    // no longer does, and only its own answer about its WAL counts.
    let to = &handover.to;
    if sw.force {
        steps.push(Step::new(
            Action::HandOverKey { to: to.clone() },
            format!("forced failover to {to}: hand the key over without waiting"),
        ));
        return true;
    }
    let received = obs
        .peers
        .as_ref()
        .and_then(|p| p.iter().find(|p| p.name == *to))
        .map(|p| p.lsn);
    match (obs.checkpoint_lsn, received) {
        (Some(stop), Some(got)) if got > stop => steps.push(Step::new(
            Action::HandOverKey { to: to.clone() },
            format!("switchover: {to} received all WAL up to our shutdown checkpoint {stop}"),
        )),
        // Its agent stopped too (a whole fleet stopped at once): no point
        // in waiting out the timeout.
        _ if dcs
            .member(to)
            .is_none_or(|m| !matches!(m.state.as_str(), "running" | "streaming")) =>
        {
            abort(
                obs,
                lease_proven(obs, settings, now),
                steps,
                &format!("{to} is gone or stopping"),
            )
        }
        _ if now.since(handover.since) >= settings.handover_timeout_ms => abort(
            obs,
            lease_proven(obs, settings, now),
            steps,
            &format!(
                "{to} did not confirm our last WAL within {} ms",
                settings.handover_timeout_ms
            ),
        ),
        _ => {}
    }
    true
}

fn abort(obs: &Observation, lease_proven: bool, steps: &mut Vec<Step>, why: &str) {
    // Without a proven lease the key may be someone else's by now: never
    // start a primary on it (the next pass decides again).
    if !obs.shutting_down && lease_proven {
        steps.push(Step::new(
            Action::StartPrimary,
            format!("switchover aborted ({why}): run as primary again"),
        ));
    }
    steps.push(Step::new(
        Action::ClearSwitchover,
        format!("switchover aborted: {why}"),
    ));
}

/// Candidate side while no leader exists: `Some(steps)` when a fresh
/// switchover decides who takes the key, `None` for a normal election.
pub fn elect(obs: &Observation, dcs: &DcsView, settings: &Settings) -> Option<Vec<Step>> {
    let sw = dcs.switchover.as_ref()?;
    let started = sw.requested_ms.max(sw.at_ms.unwrap_or(0));
    let stale_after = settings.handover_timeout_ms + 2 * settings.ttl_ms;
    if obs.wall_ms.saturating_sub(started) > stale_after {
        return None;
    }
    let running_replica = obs.local.running && obs.local.role == Some(PgRole::Replica);
    // The key is handed over only by the leader itself, in the transaction
    // that deletes it: for a switchover once its target confirmed every
    // byte up to the shutdown checkpoint, for a forced failover at once. A
    // leader whose lease ran out instead (crash, partition, fencing during
    // the handover) handed nothing over: the election's proofs apply.
    let kind = if sw.force {
        "forced failover"
    } else {
        "switchover"
    };
    match &sw.released_to {
        Some(to) if *to == obs.node && running_replica => Some(vec![Step::new(
            Action::AcquireLeader,
            format!("{kind} from {} to us", sw.from),
        )]),
        // Leave the key to the named target while it runs. One that is
        // down (crashed right after the handover, or ourselves with
        // Postgres not running yet) gets no wait: the election decides.
        Some(to)
            if *to != obs.node
                && dcs
                    .member(to)
                    .is_some_and(|m| matches!(m.state.as_str(), "running" | "streaming")) =>
        {
            Some(Vec::new())
        }
        _ => None,
    }
}
