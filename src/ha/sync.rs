//! Synchronous replication: which standbys the primary waits for, what the
//! leader claims about them in etcd, and who may be promoted because of it.
//!
//! Postgres waits for `ANY q (members)` (`synchronous_standby_names`); the
//! `sync` key holds the leader's *claim*: every commit it acknowledged is on
//! at least `quorum` of `members`. The claim must be true at every instant,
//! so a change of standbys happens in this order:
//!
//! 1. *weaken* the claim in etcd to what both the old and the new setting
//!    guarantee (`SyncSet::weakest_of`), unless the new setting already
//!    implies the published claim;
//! 2. apply the new `synchronous_standby_names` and reload;
//! 3. *strengthen* the claim to the new setting only once `quorum` of its
//!    members flushed WAL past a position taken after Postgres began to wait
//!    for them (`SyncApplied::mark`): from then on every acknowledged commit,
//!    old or new, is on them.
//!
//! A replica may be promoted automatically only when the claim proves it
//! holds every acknowledged commit: it is a member, it sees at least
//! `members - quorum + 1` members (itself included, live answers only), and
//! it is the most advanced of those it sees. Any `quorum` members intersect
//! any `members - quorum + 1`, so some member it sees holds each commit.

use super::action::{Action, Step};
use super::state::*;

/// What the primary should wait for, given the mode and the standbys that
/// stream to it now.
pub fn desired(obs: &Observation, dcs: &DcsView) -> SyncSet {
    let mode = dcs.config.synchronous_mode;
    let count = dcs.config.synchronous_node_count.max(1);
    let current = obs.local.sync_standbys.clone().unwrap_or_default();
    let mut healthy: Vec<&Replication> = obs
        .local
        .replication
        .iter()
        .filter(|r| r.state == "streaming" && eligible(dcs, &r.name))
        .collect();
    // Keep the standbys Postgres waits for while they stay healthy, then
    // the most advanced; names break ties.
    healthy.sort_by(|a, b| {
        let key = |r: &Replication| (!current.contains(&r.name), std::cmp::Reverse(r.flush_lsn));
        key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
    });
    let names: Vec<String> = healthy.iter().map(|r| r.name.clone()).collect();
    match mode {
        SyncMode::Off => SyncSet::none(),
        SyncMode::Quorum => {
            let q = count.min(names.len() as u32);
            SyncSet::new(names, q)
        }
        SyncMode::On => {
            let chosen: Vec<String> = names.into_iter().take(count as usize).collect();
            let q = chosen.len() as u32;
            SyncSet::new(chosen, q)
        }
        SyncMode::Strict => {
            let chosen: Vec<String> = names.into_iter().take(count as usize).collect();
            if !chosen.is_empty() {
                let q = chosen.len() as u32;
                return SyncSet::new(chosen, q);
            }
            if current.quorum > 0 {
                // Commits keep waiting for the standbys we had.
                return current;
            }
            strict_fallback(obs, dcs)
        }
    }
}

/// Strict mode with no streaming standby: wait for any other member (or
/// any standby at all) rather than acknowledge unprotected commits.
fn strict_fallback(obs: &Observation, dcs: &DcsView) -> SyncSet {
    let others: Vec<String> = dcs
        .members
        .iter()
        .filter(|m| m.name != obs.node && eligible(dcs, &m.name))
        .map(|m| m.name.clone())
        .collect();
    if others.is_empty() {
        SyncSet::new(vec!["*".into()], 1)
    } else {
        SyncSet::new(others, 1)
    }
}

/// A member that may be a synchronous standby: known in etcd, not tagged
/// `nosync` or `nofailover`, replay not paused (a standby that may not be
/// promoted cannot carry a claim that decides a promotion).
fn eligible(dcs: &DcsView, name: &str) -> bool {
    dcs.member(name).is_some_and(|m| {
        !m.nosync && !m.nofailover && !m.replay_paused && m.role == MemberRole::Replica
    })
}

/// The claim this leader has published, if the `sync` key is ours.
fn my_claim<'a>(obs: &Observation, dcs: &'a DcsView) -> Option<&'a SyncSet> {
    dcs.sync
        .as_ref()
        .filter(|k| k.leader == obs.node)
        .map(|k| &k.set)
}

/// Leader with a running primary: converge Postgres and the claim on the
/// desired set, one safe step at a time.
pub fn manage(obs: &Observation, dcs: &DcsView, steps: &mut Vec<Step>) {
    let Some(in_pg) = &obs.local.sync_standbys else {
        return;
    };
    if dcs.config.synchronous_mode == SyncMode::Off {
        if in_pg.quorum > 0 || !in_pg.members.is_empty() {
            steps.push(Step::new(
                Action::SetSyncStandbys {
                    set: SyncSet::none(),
                },
                "synchronous_mode off: stop waiting for standbys",
            ));
        } else if dcs.sync.is_some() {
            steps.push(Step::new(
                Action::DeleteSync,
                "synchronous_mode off and postgres waits for no standby: withdraw the sync key",
            ));
        }
        return;
    }
    let want = desired(obs, dcs);
    let claim = my_claim(obs, dcs);
    if *in_pg != want {
        let published = claim.cloned().unwrap_or_default();
        if claim.is_none() || !want.implies(&published) {
            let weaker = published.weakest_of(&want);
            steps.push(Step::new(
                Action::PublishSync { set: weaker.clone() },
                format!(
                    "before waiting for {want}: publish {weaker}, true of commits under both the old and the new setting"
                ),
            ));
        }
        let why = if want.quorum == 0 {
            format!(
                "synchronous_mode {}: no synchronous standby available, falling back to asynchronous",
                dcs.config.synchronous_mode
            )
        } else {
            format!("synchronous standbys: wait for {want} (was {in_pg})")
        };
        steps.push(Step::new(Action::SetSyncStandbys { set: want }, why));
        return;
    }
    if claim == Some(&want) {
        return;
    }
    if want.quorum == 0 {
        steps.push(Step::new(
            Action::PublishSync { set: want },
            "no synchronous standby: publish that no member is known to hold every commit",
        ));
        return;
    }
    if want.contains("*") {
        return;
    }
    let Some(applied) = obs.sync_applied.as_ref().filter(|a| a.set == want) else {
        // We do not know since when Postgres waits for them (the agent
        // restarted): apply again to start the clock.
        steps.push(Step::new(
            Action::SetSyncStandbys { set: want },
            "synchronous standbys in effect since an unknown time: apply again",
        ));
        return;
    };
    let Some(mark) = applied.mark else {
        return;
    };
    let caught_up = obs
        .local
        .replication
        .iter()
        .filter(|r| want.contains(&r.name) && r.flush_lsn >= mark)
        .count() as u32;
    if caught_up >= want.quorum {
        steps.push(Step::new(
            Action::PublishSync { set: want.clone() },
            format!(
                "{caught_up} of {want} flushed past {mark}: they hold every acknowledged commit"
            ),
        ));
    }
}

/// Before a promotion: publish our own (empty) claim and make Postgres wait
/// for what the mode asks of a fresh primary. `false` while that is not done.
pub fn before_promote(obs: &Observation, dcs: &DcsView, steps: &mut Vec<Step>) {
    let mode = dcs.config.synchronous_mode;
    let initial = match mode {
        SyncMode::Off | SyncMode::On | SyncMode::Quorum => SyncSet::none(),
        SyncMode::Strict => strict_fallback(obs, dcs),
    };
    match my_claim(obs, dcs) {
        _ if mode == SyncMode::Off => {}
        None => steps.push(Step::new(
            Action::PublishSync {
                set: SyncSet::none(),
            },
            "before promoting: our claim starts empty until standbys catch up",
        )),
        // Our claim from an earlier term: the fresh primary will not wait
        // for those standbys, so weaken it first (as `manage` does).
        Some(claim) if !initial.implies(claim) => {
            let weaker = claim.weakest_of(&initial);
            let weaker = if weaker.quorum == 0 {
                SyncSet::none()
            } else {
                weaker
            };
            steps.push(Step::new(
                Action::PublishSync { set: weaker.clone() },
                format!("before promoting: our earlier claim {claim} would not hold once we wait for {initial}: publish {weaker}"),
            ))
        }
        Some(_) => {}
    }
    if obs.local.sync_standbys.as_ref() != Some(&initial) {
        steps.push(Step::new(
            Action::SetSyncStandbys { set: initial },
            format!("before promoting: synchronous_mode {mode}"),
        ));
    }
}

/// Whether this replica may be promoted under the published claim: `None`
/// when no claim restricts promotion (asynchronous replication).
pub fn candidacy(obs: &Observation, dcs: &DcsView) -> Option<Result<(), String>> {
    if dcs.config.synchronous_mode == SyncMode::Off {
        return None;
    }
    let key = dcs.sync.as_ref()?;
    let set = &key.set;
    if key.leader == obs.node {
        // We published the claim: we were the last primary (every new
        // leader publishes its own before it promotes), so we hold every
        // commit we acknowledged. A leader that stopped without a standby
        // to hand over to takes the key back this way.
        return Some(Ok(()));
    }
    if set.quorum == 0 || set.contains("*") {
        return Some(Err(format!(
            "synchronous_mode {}: the last leader ({}) claimed no standby holds every acknowledged commit",
            dcs.config.synchronous_mode, key.leader
        )));
    }
    if !set.contains(&obs.node) {
        return Some(Err(format!("not in the synchronous set {set}")));
    }
    let Some(peers) = &obs.peers else {
        return Some(Err(
            "waiting for live WAL positions of the synchronous standbys".into(),
        ));
    };
    let me = (
        obs.local.timeline.unwrap_or(0),
        obs.local
            .receive_lsn
            .max(obs.local.replay_lsn)
            .or(obs.local.wal_position)
            .unwrap_or_default(),
    );
    let mut seen = 1u32;
    for p in peers.iter().filter(|p| set.contains(&p.name)) {
        // A position from before the leader was gone may be short of what
        // the member holds now: it may still make us yield, never count.
        if p.saw_no_leader {
            seen += 1;
        }
        let theirs = (p.timeline.unwrap_or(0), p.lsn);
        let priority = dcs
            .member(&p.name)
            .map(|m| m.failover_priority)
            .unwrap_or(0);
        let tie_goes_to_them = (priority, std::cmp::Reverse(&p.name))
            > (obs.tags.failover_priority, std::cmp::Reverse(&obs.node));
        if theirs > me || (theirs == me && tie_goes_to_them) {
            return Some(Err(format!(
                "{} holds more of the synchronous WAL (or ties and ranks higher)",
                p.name
            )));
        }
    }
    let needed = set.members.len() as u32 - set.quorum + 1;
    if seen < needed {
        return Some(Err(format!(
            "sees {seen} of the {needed} members of {set} needed to prove it holds every acknowledged commit"
        )));
    }
    Some(Ok(()))
}

/// `synchronous_standby_names` for a set.
pub fn standby_names(set: &SyncSet) -> String {
    if set.quorum == 0 || set.members.is_empty() {
        return String::new();
    }
    if set.members.iter().any(|m| m == "*") {
        return "*".into();
    }
    let quoted: Vec<String> = set
        .members
        .iter()
        .map(|m| format!("\"{}\"", m.replace('"', "\"\"")))
        .collect();
    format!("ANY {} ({})", set.quorum, quoted.join(", "))
}

/// Reads back a `synchronous_standby_names` the agent wrote; `None` for
/// anything else.
pub fn parse_standby_names(s: &str) -> Option<SyncSet> {
    let s = s.trim();
    if s.is_empty() {
        return Some(SyncSet::none());
    }
    if s == "*" {
        return Some(SyncSet::new(vec!["*".into()], 1));
    }
    let rest = s.strip_prefix("ANY ")?;
    let (n, list) = rest.split_once(' ')?;
    let quorum: u32 = n.parse().ok()?;
    let list = list.trim().strip_prefix('(')?.strip_suffix(')')?;
    let mut members = Vec::new();
    let mut chars = list.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ' || *c == ',') {
            chars.next();
        }
        match chars.next() {
            None => break,
            Some('"') => {
                let mut name = String::new();
                loop {
                    match chars.next()? {
                        '"' if chars.peek() == Some(&'"') => {
                            chars.next();
                            name.push('"');
                        }
                        '"' => break,
                        c => name.push(c),
                    }
                }
                members.push(name);
            }
            Some(_) => return None,
        }
    }
    let set = SyncSet::new(members, quorum);
    (set.quorum == quorum).then_some(set)
}
