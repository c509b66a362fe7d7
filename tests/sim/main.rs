//! Deterministic simulation of the HA core: N nodes of the real
//! `pgha::ha::decide` against a simulated etcd, Postgres, network, clocks
//! and faults, one schedule per seed.
//!
//! ```text
//! cargo test --test sim                                  # CI: schedules + the two "finds bugs" checks
//! cargo test --release --test sim -- --seed N            # replay one schedule with its trace
//! cargo test --release --test sim -- --schedules 1000000 # long campaign
//! ```
//! Options: `--seed N`, `--schedules N`, `--from N` (first seed),
//! `--no-fencing`, `--hide-lag`, `--live-api`, `--sync off|on|strict|quorum`,
//! `--trace-decisions` (with `--seed`: every decision and its inputs).

mod agent;
mod etcd;
mod postgres;
mod rng;
mod world;

use std::collections::BTreeMap;
use std::time::Instant;

use pgha::ha::SyncMode;
use world::{FaultKind, Knobs, Schedule, World, FAULT_KINDS};

/// Schedules CI runs (debug builds run fewer; see `scripts/test`).
const CI_SCHEDULES_RELEASE: u64 = 10_000;
const CI_SCHEDULES_DEBUG: u64 = 500;
/// Budget of the "finds bugs" checks.
const BUG_BUDGET: u64 = 2_000;

struct Args {
    seed: Option<u64>,
    schedules: Option<u64>,
    from: u64,
    knobs: Knobs,
}

fn parse_args() -> Args {
    let mut args = Args {
        seed: None,
        schedules: None,
        from: 0,
        knobs: Knobs::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> u64 {
            it.next()
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or_else(|| panic!("{what} needs a number"))
        };
        match a.as_str() {
            "--seed" => args.seed = Some(num("--seed")),
            "--schedules" => args.schedules = Some(num("--schedules")),
            "--from" => args.from = num("--from"),
            "--no-fencing" => args.knobs.no_fencing = true,
            "--hide-lag" => args.knobs.hide_lag = true,
            "--live-api" => args.knobs.live_api = true,
            "--unbounded-start-wait" => args.knobs.unbounded_start_wait = true,
            "--ignore-rewind-marker" => args.knobs.ignore_rewind_marker = true,
            "--no-start-repoint" => args.knobs.no_start_repoint = true,
            "--unreachable-rewind-fails" => args.knobs.unreachable_rewind_fails = true,
            "--frozen-route" => args.knobs.frozen_route = true,
            "--no-balancer-hold" => args.knobs.no_balancer_hold = true,
            "--only-cluster-restart" => args.knobs.only_fault = Some(FaultKind::ClusterRestart),
            "--trace-decisions" => args.knobs.trace_decisions = true,
            "--sync" => {
                args.knobs.sync_mode = Some(match it.next().as_deref() {
                    Some("off") => SyncMode::Off,
                    Some("on") => SyncMode::On,
                    Some("strict") => SyncMode::Strict,
                    Some("quorum") => SyncMode::Quorum,
                    other => panic!("--sync off|on|strict|quorum, got {other:?}"),
                })
            }
            // Whatever libtest options `cargo test` passes along.
            _ => {}
        }
    }
    args
}

/// Runs one schedule; `Err` carries the violation.
pub fn run_one(seed: u64, knobs: &Knobs) -> (World, Result<(), String>) {
    let mut w = World::new(Schedule::generate(seed, knobs.clone()));
    w.run();
    let r = match w.violation.clone() {
        Some(v) => Err(v),
        None => Ok(()),
    };
    (w, r)
}

fn describe(s: &Schedule) -> String {
    let c = &s.cfg;
    let mut out = format!(
        "seed {}: {} nodes, ttl {} ms, synchronous_mode {} (count {}), clock drift up to {} ppm, message loss {}‰{}{}\n",
        s.seed,
        c.nodes,
        c.ttl_ms,
        c.sync_mode,
        c.sync_count,
        c.max_drift_ppm,
        c.loss_permille,
        if c.knobs.no_fencing { ", FENCING OFF" } else { "" },
        if c.knobs.hide_lag { ", CANDIDATES BLIND TO LAG" } else { "" },
    );
    for f in &s.faults {
        out += &format!(
            "  at {:>6} ms: {:?} on n{}{} for {} ms\n",
            f.at,
            f.kind,
            f.node + 1,
            if f.kind == world::FaultKind::PeerCut {
                format!("/n{}", f.other + 1)
            } else {
                String::new()
            },
            f.duration
        );
    }
    out += &format!("  all healed at {} ms\n", s.heal_at);
    out
}

fn knob_flags(k: &Knobs) -> String {
    let mut s = String::new();
    if k.no_fencing {
        s += " --no-fencing";
    }
    if k.hide_lag {
        s += " --hide-lag";
    }
    if k.live_api {
        s += " --live-api";
    }
    if k.unbounded_start_wait {
        s += " --unbounded-start-wait";
    }
    if k.ignore_rewind_marker {
        s += " --ignore-rewind-marker";
    }
    if k.no_start_repoint {
        s += " --no-start-repoint";
    }
    if k.unreachable_rewind_fails {
        s += " --unreachable-rewind-fails";
    }
    if k.frozen_route {
        s += " --frozen-route";
    }
    if k.no_balancer_hold {
        s += " --no-balancer-hold";
    }
    if k.only_fault == Some(FaultKind::ClusterRestart) {
        s += " --only-cluster-restart";
    }
    if let Some(m) = k.sync_mode {
        s += &format!(" --sync {m}");
    }
    s
}

/// Replays a seed with the trace on and prints it.
fn replay(seed: u64, knobs: &Knobs, tail: Option<usize>) -> Result<(), String> {
    let mut knobs = knobs.clone();
    knobs.trace = true;
    let (w, r) = run_one(seed, &knobs);
    println!("{}", describe(&w.sched));
    let trace = w.trace.as_deref().unwrap_or_default();
    let skip = tail.map_or(0, |t| trace.len().saturating_sub(t));
    if skip > 0 {
        println!("  ... {skip} earlier trace lines (replay the seed for all of them)");
    }
    for line in &trace[skip..] {
        println!("  {line}");
    }
    match &r {
        Ok(()) => println!(
            "seed {seed}: no violation ({} events, {} decisions, {} commits acknowledged, {} promotions, primary {} ms after the last heal)",
            w.stats.events,
            w.stats.decides,
            w.stats.acked,
            w.stats.promotions,
            w.stats.recovery_ms.map_or("never".into(), |m| m.to_string())
        ),
        Err(v) => println!("seed {seed}: VIOLATION {v}"),
    }
    r
}

struct Campaign {
    schedules: u64,
    violations: Vec<(u64, String)>,
    faults: BTreeMap<String, u64>,
    modes: BTreeMap<String, u64>,
    events: u64,
    worst_recovery: u64,
    routed_writes: u64,
    elapsed: f64,
}

fn campaign(from: u64, n: u64, knobs: &Knobs, stop_at_first: bool) -> Campaign {
    let started = Instant::now();
    let mut c = Campaign {
        schedules: 0,
        violations: Vec::new(),
        faults: BTreeMap::new(),
        modes: BTreeMap::new(),
        events: 0,
        worst_recovery: 0,
        routed_writes: 0,
        elapsed: 0.0,
    };
    for k in FAULT_KINDS {
        c.faults.insert(format!("{k:?}"), 0);
    }
    for seed in from..from + n {
        let (w, r) = run_one(seed, knobs);
        c.schedules += 1;
        c.events += w.stats.events;
        c.routed_writes += w.stats.routed_writes;
        for f in &w.sched.faults {
            *c.faults.entry(format!("{:?}", f.kind)).or_default() += 1;
        }
        *c.modes.entry(w.cfg.sync_mode.to_string()).or_default() += 1;
        c.worst_recovery = c.worst_recovery.max(w.stats.recovery_ms.unwrap_or(0));
        if let Err(v) = r {
            c.violations.push((seed, v));
            if stop_at_first {
                break;
            }
        }
    }
    c.elapsed = started.elapsed().as_secs_f64();
    c
}

fn report(c: &Campaign) {
    println!(
        "sim: {} schedules in {:.1} s: {:.0} schedules/s, {:.0} events/s; worst time to a primary after the last heal: {} ms",
        c.schedules,
        c.elapsed,
        c.schedules as f64 / c.elapsed.max(1e-9),
        c.events as f64 / c.elapsed.max(1e-9),
        c.worst_recovery
    );
    let mix: Vec<String> = c.faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("sim: fault mix: {}", mix.join(", "));
    let modes: Vec<String> = c.modes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("sim: synchronous_mode: {}", modes.join(", "));
    println!(
        "sim: {} client writes went through the nodes' routers (ha::route), each checked against the leader key",
        c.routed_writes
    );
}

/// A campaign with a deliberately broken cluster must find `want`.
fn must_find(what: &str, knobs: &Knobs, want: &str) -> bool {
    let c = campaign(0, BUG_BUDGET, knobs, true);
    match c.violations.first() {
        Some((seed, v)) if v.contains(want) => {
            println!(
                "sim: {what}: found after {} schedule(s): seed {seed}: {v} (replay: cargo test --release --test sim --{} --seed {seed})",
                c.schedules,
                knob_flags(knobs)
            );
            true
        }
        Some((seed, v)) => {
            println!("sim: {what}: expected '{want}', first violation was seed {seed}: {v}");
            false
        }
        None => {
            println!("sim: {what}: NOT FOUND within {BUG_BUDGET} schedules");
            false
        }
    }
}

/// A campaign with one planted fault kind and its fix must stay clean.
fn must_pass(what: &str, knobs: &Knobs) -> bool {
    let c = campaign(0, BUG_BUDGET, knobs, true);
    match c.violations.first() {
        None => {
            println!(
                "sim: {what}: {} schedules clean (worst time to a primary after the last heal: {} ms)",
                c.schedules, c.worst_recovery
            );
            true
        }
        Some((seed, v)) => {
            println!(
                "sim: {what}: VIOLATION seed {seed}: {v} (replay: cargo test --release --test sim --{} --seed {seed})",
                knob_flags(knobs)
            );
            false
        }
    }
}

fn main() {
    let args = parse_args();
    if let Some(seed) = args.seed {
        if replay(seed, &args.knobs, None).is_err() {
            std::process::exit(1);
        }
        return;
    }
    let explicit = args.schedules.is_some();
    let n = args.schedules.unwrap_or(if cfg!(debug_assertions) {
        CI_SCHEDULES_DEBUG
    } else {
        CI_SCHEDULES_RELEASE
    });
    let c = campaign(args.from, n, &args.knobs, false);
    report(&c);
    let unknown = &c.violations;
    for (seed, v) in unknown {
        println!("sim: violation: seed {seed}: {v}");
    }
    let mut ok = unknown.is_empty();
    for (seed, v) in unknown.iter().take(3) {
        println!("\nsim: VIOLATION seed {seed}: {v}");
        let _ = replay(*seed, &args.knobs, Some(150));
        println!(
            "sim: replay: cargo test --release --test sim --{} --seed {seed}",
            knob_flags(&args.knobs)
        );
    }
    if !explicit {
        // The simulator must be able to find bugs.
        let split = Knobs {
            no_fencing: true,
            ..Knobs::default()
        };
        ok &= must_find("fencing off", &split, "split brain");
        let blind = Knobs {
            hide_lag: true,
            sync_mode: Some(SyncMode::On),
            ..Knobs::default()
        };
        ok &= must_find(
            "candidates blind to lag, synchronous_mode on",
            &blind,
            "lost write",
        );
        // Issue 26: a half-rewound member started anyway stays `starting`;
        // waiting for it for good leaves the cluster without a primary...
        let stuck = Knobs {
            ignore_rewind_marker: true,
            unbounded_start_wait: true,
            only_fault: Some(FaultKind::ClusterRestart),
            sync_mode: Some(SyncMode::Off),
            ..Knobs::default()
        };
        ok &= must_find(
            "election waits for a starting member for good",
            &stuck,
            "liveness",
        );
        // ...and the bound alone (marker still ignored) restores a primary.
        let bounded = Knobs {
            unbounded_start_wait: false,
            ..stuck
        };
        // The member left `starting` must not wait for good either: its
        // start waits for WAL from an upstream it was never given...
        let unfed = Knobs {
            no_start_repoint: true,
            ..bounded
        };
        ok &= must_find(
            "a starting standby not pointed at the new leader",
            &unfed,
            "stuck standby start",
        );
        // A rewind tried while its source's Postgres is not up yet (stale
        // member keys after a restart) changed nothing; counted as a failed
        // pg_rewind it leaves the member down for good.
        let down = Knobs {
            unreachable_rewind_fails: true,
            ..Knobs::default()
        };
        ok &= must_find(
            "a rewind whose source is not up counts as failed",
            &down,
            "member left down",
        );
        // A router that does not follow the leader leaves clients on a
        // node that no longer takes writes.
        let frozen = Knobs {
            frozen_route: true,
            ..Knobs::default()
        };
        ok &= must_find("a router that keeps its first primary", &frozen, "router");
        // A stopped primary back as a standby within a load balancer's
        // window would take writers through the balancer's primary port.
        let eager = Knobs {
            no_balancer_hold: true,
            ..Knobs::default()
        };
        ok &= must_find(
            "a stopped primary restarted within the balancer window",
            &eager,
            "balancer window",
        );
        // ...and with the bound and the repoint, both hold.
        ok &= must_pass(
            "a starting member is waited for at most primary_start_timeout, then pointed at the leader",
            &bounded,
        );
    }
    if !ok {
        std::process::exit(1);
    }
}
