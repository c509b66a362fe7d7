//! One suite run: the cluster, the chosen scenarios with their repeats, the
//! table. Shared by the `chaos-tests run` command and the CI test.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::check::RunResult;
use crate::cluster::{docker_answers, Cluster, Timing};
use crate::report;
use crate::scenarios::{self, Scenario};

pub struct Options {
    /// Names or numbers; empty: every implemented scenario.
    pub scenarios: Vec<String>,
    pub repeat: usize,
    pub sync: String,
    pub ttl: u64,
}

pub enum Outcome {
    /// No Docker engine answers.
    Skipped,
    Ran(Vec<RunResult>),
}

impl Outcome {
    pub fn passed(&self) -> bool {
        match self {
            Outcome::Skipped => true,
            Outcome::Ran(r) => r.iter().all(RunResult::passed),
        }
    }
}

fn select(names: &[String]) -> Result<Vec<Scenario>> {
    let all = scenarios::all();
    if names.is_empty() {
        return Ok(all);
    }
    for n in names {
        if !all
            .iter()
            .any(|s| s.name == n || s.number.to_string() == *n)
        {
            let missing = scenarios::MISSING
                .iter()
                .any(|(num, name)| name == n || num.to_string() == *n);
            bail!(
                "unknown scenario {n:?}{} (`chaos-tests list`)",
                if missing { ": not implemented yet" } else { "" }
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| {
            names
                .iter()
                .any(|n| s.name == n || s.number.to_string() == *n)
        })
        .collect())
}

pub fn run(opts: &Options) -> Result<Outcome> {
    if !["on", "off", "strict", "quorum"].contains(&opts.sync.as_str()) {
        bail!("--sync must be on, off, strict or quorum");
    }
    let chosen = select(&opts.scenarios)?;
    if !docker_answers() {
        eprintln!("SKIPPED chaos-tests: `docker info` fails, no Docker engine answers");
        return Ok(Outcome::Skipped);
    }
    let timing = Timing {
        ttl: Duration::from_secs(opts.ttl),
        ..Timing::default()
    };
    let started = Instant::now();
    let mut cluster = Cluster::start(timing, &opts.sync)?;
    scenarios::prepare(&cluster)?;
    let mut results = Vec::new();
    for scenario in &chosen {
        for repeat in 0..opts.repeat {
            let run_started = Instant::now();
            let r = scenarios::run_once(&cluster, scenario, repeat);
            eprintln!(
                "chaos: {} #{repeat}: {} in {:.0} s; lost {}, split-brain {}, converged {}, RTO {:?} ms{}",
                r.scenario,
                if r.passed() { "passed" } else { "FAILED" },
                run_started.elapsed().as_secs_f64(),
                r.lost,
                r.split_brain_events,
                r.converged,
                r.writers.iter().map(|w| w.rto_ms).collect::<Vec<_>>(),
                r.violations
                    .iter()
                    .map(|v| format!("\n  violation: {v}"))
                    .collect::<String>()
            );
            for n in &r.notes {
                eprintln!("  note: {n}");
            }
            // A run that left the cluster stuck (its failure and diagnostics
            // are recorded) must not fail every later one as "not ready":
            // the rest run on a fresh cluster.
            let stuck = !r.converged;
            results.push(r);
            if stuck && scenarios::ready(&cluster, Duration::from_secs(30)).is_err() {
                eprintln!(
                    "chaos: the cluster did not converge again: replacing it with a fresh one"
                );
                drop(cluster);
                cluster = Cluster::start(timing, &opts.sync)?;
                scenarios::prepare(&cluster)?;
            }
        }
    }
    let subset = chosen.len() < scenarios::all().len();
    let header = format!(
        "pgha chaos suite: synchronous_mode={}, ttl {} s, loop_wait 1 s, {} repeat(s), {:.0} s in all{}",
        opts.sync,
        opts.ttl,
        opts.repeat,
        started.elapsed().as_secs_f64(),
        if subset {
            format!(
                "; a SUBSET: {} of {} scenarios",
                chosen.len(),
                scenarios::all().len()
            )
        } else {
            String::new()
        }
    );
    let md = report::markdown(&results, &header);
    println!("{md}");
    // A subset never overwrites the table of a full run.
    let stem = format!(
        "latest-sync-{}{}{}",
        opts.sync,
        if subset { "-subset" } else { "" },
        match opts.repeat {
            1 => String::new(),
            n => format!("-x{n}"),
        }
    );
    match report::write(&results, &header, &stem) {
        Ok(path) => eprintln!("chaos: table written to {}", path.display()),
        Err(e) => eprintln!("chaos: writing results: {e}"),
    }
    drop(cluster);
    Ok(Outcome::Ran(results))
}
