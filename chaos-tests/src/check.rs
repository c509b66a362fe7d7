//! The checker: judges one scenario run from the writers' logs, the prober's
//! rounds, the rows the converged primary holds and the promotion history.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::workload::{Round, WriterLog};

/// A row of the writes table as the converged primary has it.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub writer: String,
    pub seq: i64,
    pub node: String,
    pub timeline: u32,
    pub server_ms: f64,
}

/// One promotion from the cluster's `history` key.
#[derive(Debug, Clone, Serialize)]
pub struct Promotion {
    pub kind: String,
    pub timeline: Option<u32>,
    pub at_ms: u64,
    pub new_leader: String,
}

/// What a scenario run hands the checker.
pub struct Evidence {
    pub writers: Vec<WriterLog>,
    pub rounds: Vec<Round>,
    pub rows: Vec<StoredRow>,
    /// The whole history after the run, and the wall-clock start of the run.
    pub history: Vec<Promotion>,
    pub run_started_ms: f64,
    pub fault_at: Instant,
    pub healed_at: Instant,
    /// Time from healing to convergence, None when it did not converge in 60 s.
    pub converged_after: Option<Duration>,
    /// How many promotions the faults of this scenario may cause.
    pub allowed_promotions: usize,
    /// Whether acknowledged writes must all survive (synchronous mode).
    pub sync: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct WriterResult {
    pub writer: String,
    pub acked: usize,
    pub unknown: usize,
    pub lost: usize,
    /// Longest time without an acknowledgement across the fault, in ms;
    /// None when the writer never wrote again.
    pub rto_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub scenario: String,
    pub repeat: usize,
    pub writers: Vec<WriterResult>,
    pub lost: usize,
    pub split_brain_events: usize,
    pub promotions: usize,
    pub converged: bool,
    pub converged_after_ms: Option<u64>,
    /// Every violated property, in words (empty when the run passed).
    pub violations: Vec<String>,
    /// Things worth knowing that are not violations.
    pub notes: Vec<String>,
}

impl RunResult {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

pub fn judge(scenario: &str, repeat: usize, ev: &Evidence) -> RunResult {
    let mut violations = Vec::new();
    let mut notes = Vec::new();
    let stored: HashSet<(&str, i64)> = ev.rows.iter().map(|r| (r.writer.as_str(), r.seq)).collect();

    // Acknowledged writes lost (set semantics: present or not).
    let mut writers = Vec::new();
    let mut lost_total = 0;
    for log in &ev.writers {
        let mut lost = Vec::new();
        for (seq, ack) in log.acks() {
            if !stored.contains(&(log.writer.as_str(), seq)) {
                lost.push((seq, ack.node.clone(), ack.timeline));
            }
        }
        if !lost.is_empty() {
            let msg = format!(
                "writer {}: {} acknowledged writes lost, first {:?}",
                log.writer,
                lost.len(),
                &lost[..lost.len().min(5)]
            );
            if ev.sync {
                violations.push(msg);
            } else {
                notes.push(format!("RPO: {msg}"));
            }
        }
        lost_total += lost.len();
        // Rows no insert of this writer could have produced.
        let attempted: HashSet<i64> = log.attempts.iter().map(|a| a.seq).collect();
        let phantom = ev
            .rows
            .iter()
            .filter(|r| r.writer == log.writer && !attempted.contains(&r.seq))
            .count();
        if phantom > 0 {
            violations.push(format!("writer {}: {phantom} rows never sent", log.writer));
        }
        let rejected_present = log
            .attempts
            .iter()
            .filter(|a| matches!(a.outcome, crate::workload::Outcome::Rejected(_)))
            .filter(|a| stored.contains(&(log.writer.as_str(), a.seq)))
            .count();
        if rejected_present > 0 {
            violations.push(format!(
                "writer {}: {rejected_present} inserts answered with an ERROR are stored",
                log.writer
            ));
        }
        let rto = rto(log, ev.fault_at);
        if rto.is_none() {
            violations.push(format!(
                "writer {}: no acknowledged write after the fault",
                log.writer
            ));
        }
        writers.push(WriterResult {
            writer: log.writer.clone(),
            acked: log.acks().count(),
            unknown: log.unknown(),
            lost: lost.len(),
            rto_ms: rto.map(|d| d.as_millis() as u64),
        });
    }

    // At most one writer, as the prober saw it.
    let mut split_brain = 0;
    let mut in_event = false;
    for round in &ev.rounds {
        let primaries = round
            .nodes
            .iter()
            .filter(|n| n.primary_200 == Some(true))
            .count();
        let writable = round
            .nodes
            .iter()
            .filter(|n| n.writable == Some(true))
            .count();
        let bad = primaries > 1 || writable > 1;
        if bad && !in_event {
            split_brain += 1;
            violations.push(format!(
                "prober: {primaries} nodes answered 200 on /primary and {writable} were writable \
                 in the same round, {:.1} s after the fault: {:?}",
                round
                    .at
                    .saturating_duration_since(ev.fault_at)
                    .as_secs_f64(),
                round.nodes
            ));
        }
        in_event = bad;
    }

    // At most one writer, from timelines: no write committed on a timeline
    // after a newer timeline was promoted, and timelines never go back in
    // the order the servers stamped the writes.
    let promotions_by_tl: BTreeMap<u32, u64> = ev
        .history
        .iter()
        .filter_map(|p| Some((p.timeline?, p.at_ms)))
        .collect();
    let mut stamped: Vec<(f64, u32, String, String)> = ev
        .rows
        .iter()
        .map(|r| {
            (
                r.server_ms,
                r.timeline,
                r.node.clone(),
                format!("{}#{}", r.writer, r.seq),
            )
        })
        .collect();
    for log in &ev.writers {
        for (seq, ack) in log.acks() {
            stamped.push((
                ack.server_ms,
                ack.timeline,
                ack.node.clone(),
                format!("{}#{seq} (ack)", log.writer),
            ));
        }
    }
    let mut stale = 0;
    for (ms, tl, node, what) in &stamped {
        if let Some((newer, at)) = promotions_by_tl.range(tl + 1..).next() {
            if *ms > *at as f64 + 1.0 {
                stale += 1;
                if stale <= 3 {
                    violations.push(format!(
                        "{what} written on {node} timeline {tl} {:.0} ms after timeline {newer} was promoted",
                        ms - *at as f64
                    ));
                }
            }
        }
    }
    stamped.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut max_tl = 0;
    for (ms, tl, node, what) in &stamped {
        if *tl < max_tl {
            violations.push(format!(
                "{what} written on {node} timeline {tl} at {ms:.0} ms, after a write on timeline {max_tl}"
            ));
            split_brain += 1;
            break;
        }
        max_tl = max_tl.max(*tl);
    }
    if stale > 0 {
        split_brain += 1;
    }

    // Leadership moves forward: the leader key revision each node reports
    // never goes back, the history's timelines only increase, and no more
    // promotions than the faults allow.
    for (i, node) in crate::cluster::NODES.iter().enumerate() {
        let mut last = 0;
        for round in &ev.rounds {
            if let Some(term) = round.nodes[i].term {
                if term < last {
                    violations.push(format!(
                        "{node} reported leader revision {term} after {last}"
                    ));
                    break;
                }
                last = term;
            }
        }
    }
    let tls: Vec<u32> = ev.history.iter().filter_map(|p| p.timeline).collect();
    if tls.windows(2).any(|w| w[1] <= w[0]) {
        violations.push(format!("history timelines do not increase: {tls:?}"));
    }
    let promotions = ev
        .history
        .iter()
        .filter(|p| p.at_ms as f64 >= ev.run_started_ms)
        .count();
    if promotions > ev.allowed_promotions {
        violations.push(format!(
            "{promotions} promotions for {} allowed by the faults",
            ev.allowed_promotions
        ));
    }

    let converged = ev.converged_after.is_some();
    if !converged {
        violations.push("did not converge within 60 s of healing".into());
    }
    RunResult {
        scenario: scenario.to_string(),
        repeat,
        writers,
        lost: lost_total,
        split_brain_events: split_brain,
        promotions,
        converged,
        converged_after_ms: ev.converged_after.map(|d| d.as_millis() as u64),
        violations,
        notes,
    }
}

/// The longest time without an acknowledgement over the gaps that end after
/// `fault_at` (the run goes on until every writer wrote on the converged
/// cluster); None when nothing was acknowledged after the fault.
fn rto(log: &WriterLog, fault_at: Instant) -> Option<Duration> {
    let mut acks: Vec<Instant> = log.acks().map(|(_, a)| a.at).collect();
    acks.sort();
    let mut prev = acks
        .iter()
        .rev()
        .find(|a| **a <= fault_at)
        .copied()
        .unwrap_or(fault_at);
    let mut max = None;
    for a in acks.into_iter().filter(|a| *a > fault_at) {
        max = Some(max.unwrap_or(Duration::ZERO).max(a.duration_since(prev)));
        prev = a;
    }
    max
}

#[cfg(test)]
mod tests {
    //! The checker must catch what it exists to catch: fed histories with a
    //! lost write, two primaries and a stale-timeline write, it reports each.

    use super::*;
    use crate::workload::{Ack, Attempt, NodeProbe, Outcome};

    fn ack(t0: Instant, ms: u64, node: &str, tl: u32, server_ms: f64) -> Outcome {
        Outcome::Acked(Ack {
            at: t0 + Duration::from_millis(ms),
            node: node.into(),
            timeline: tl,
            server_ms,
        })
    }

    fn row(seq: i64, node: &str, tl: u32, server_ms: f64) -> StoredRow {
        StoredRow {
            writer: "w".into(),
            seq,
            node: node.into(),
            timeline: tl,
            server_ms,
        }
    }

    /// Writer w: seq 1 acked on n1 (tl 1) before the fault at 1 s, seq 2
    /// unknown, seq 3 acked on n2 (tl 2) at 4 s. n2 promoted at 3000 ms.
    fn evidence(t0: Instant) -> Evidence {
        let attempts = vec![
            Attempt {
                seq: 1,
                sent: t0,
                outcome: ack(t0, 500, "n1", 1, 500.0),
            },
            Attempt {
                seq: 2,
                sent: t0 + Duration::from_millis(1100),
                outcome: Outcome::Unknown("connection closed".into()),
            },
            Attempt {
                seq: 3,
                sent: t0 + Duration::from_millis(3900),
                outcome: ack(t0, 4000, "n2", 2, 3950.0),
            },
        ];
        let one_primary = [
            NodeProbe {
                primary_200: Some(true),
                writable: Some(true),
                term: Some(3),
            },
            NodeProbe {
                primary_200: Some(false),
                writable: Some(false),
                term: Some(3),
            },
            NodeProbe::default(),
        ];
        Evidence {
            writers: vec![WriterLog {
                writer: "w".into(),
                attempts,
                connect_failures: 0,
            }],
            rounds: vec![Round {
                at: t0,
                nodes: one_primary,
            }],
            rows: vec![row(1, "n1", 1, 500.0), row(3, "n2", 2, 3950.0)],
            history: vec![Promotion {
                kind: "failover".into(),
                timeline: Some(2),
                at_ms: 3000,
                new_leader: "n2".into(),
            }],
            run_started_ms: 900.0,
            fault_at: t0 + Duration::from_secs(1),
            healed_at: t0 + Duration::from_secs(2),
            converged_after: Some(Duration::from_secs(3)),
            allowed_promotions: 1,
            sync: true,
        }
    }

    #[test]
    fn a_clean_history_passes_with_its_rto() {
        let t0 = Instant::now();
        let r = judge("x", 0, &evidence(t0));
        assert!(r.passed(), "{:?}", r.violations);
        assert_eq!(r.writers[0].rto_ms, Some(3500));
        assert_eq!(r.writers[0].unknown, 1);
        assert_eq!(r.promotions, 1);
    }

    #[test]
    fn an_unknown_outcome_may_be_stored() {
        let t0 = Instant::now();
        let mut ev = evidence(t0);
        ev.rows.push(row(2, "n1", 1, 1100.0));
        assert!(judge("x", 0, &ev).passed());
    }

    #[test]
    fn a_lost_acknowledged_write_fails_in_sync_mode_only() {
        let t0 = Instant::now();
        let mut ev = evidence(t0);
        ev.rows.retain(|r| r.seq != 1);
        let r = judge("x", 0, &ev);
        assert_eq!(r.lost, 1);
        assert!(!r.passed());
        ev.sync = false;
        let r = judge("x", 0, &ev);
        assert_eq!(r.lost, 1);
        assert!(r.passed(), "async: loss is RPO, reported as a note");
        assert!(r.notes[0].starts_with("RPO"));
    }

    #[test]
    fn two_primaries_in_one_round_are_split_brain() {
        let t0 = Instant::now();
        let mut ev = evidence(t0);
        ev.rounds[0].nodes[1].primary_200 = Some(true);
        ev.rounds.push(ev.rounds[0].clone());
        let mut writable = ev.rounds[0].clone();
        writable.nodes[1].primary_200 = Some(false);
        writable.nodes[2].writable = Some(true);
        ev.rounds.push(writable);
        let r = judge("x", 0, &ev);
        // Consecutive bad rounds are one event.
        assert_eq!(r.split_brain_events, 1, "{:?}", r.violations);
        assert!(!r.passed());
    }

    #[test]
    fn a_write_on_an_old_timeline_after_a_promotion_is_split_brain() {
        let t0 = Instant::now();
        let mut ev = evidence(t0);
        // Committed on n1, timeline 1, 200 ms after n2 was promoted.
        ev.rows.push(row(2, "n1", 1, 3200.0));
        let r = judge("x", 0, &ev);
        assert!(r.split_brain_events >= 1, "{:?}", r.violations);
        assert!(!r.passed());
    }

    #[test]
    fn more_promotions_than_faults_fail() {
        let t0 = Instant::now();
        let mut ev = evidence(t0);
        ev.history.push(Promotion {
            kind: "failover".into(),
            timeline: Some(3),
            at_ms: 5000,
            new_leader: "n3".into(),
        });
        assert!(!judge("x", 0, &ev).passed());
        ev.history[1].timeline = Some(2);
        ev.allowed_promotions = 2;
        let r = judge("x", 0, &ev);
        assert!(r.violations.iter().any(|v| v.contains("do not increase")));
    }

    #[test]
    fn a_leader_revision_going_back_fails() {
        let t0 = Instant::now();
        let mut ev = evidence(t0);
        ev.rounds[0].nodes[1].term = Some(7);
        let mut later = ev.rounds[0].clone();
        later.nodes[1].term = Some(5);
        ev.rounds.push(later);
        let r = judge("x", 0, &ev);
        assert!(r
            .violations
            .iter()
            .any(|v| v.contains("leader revision 5 after 7")));
    }

    #[test]
    fn no_write_after_the_fault_or_no_convergence_fails() {
        let t0 = Instant::now();
        let mut ev = evidence(t0);
        ev.converged_after = None;
        assert!(!judge("x", 0, &ev).passed());
        let mut ev = evidence(t0);
        ev.writers[0].attempts.pop();
        ev.rows.pop();
        let r = judge("x", 0, &ev);
        assert_eq!(r.writers[0].rto_ms, None);
        assert!(!r.passed());
    }
}
