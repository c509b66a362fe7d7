//! The scenarios: each injects one kind of fault into the cluster (only into
//! containers and the network of this suite's own compose project), heals
//! it, and the runner around it drives the workload, waits for convergence
//! and hands the evidence to the checker.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::check::{self, Evidence, Promotion, RunResult, StoredRow};
use crate::cluster::{run_ok, wait_for, Cluster, API_TOKEN, ETCDS, NODES};
use crate::http;
use crate::netem::{self, Netem, NetemThread};
use crate::workload::{self, Prober, Target, Writer};

/// How long after healing the cluster has to converge.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(60);

pub struct Scenario {
    pub number: u8,
    pub name: &'static str,
    pub summary: &'static str,
    /// Promotions the fault may cause.
    pub allowed_promotions: usize,
    inject: fn(&Cluster) -> Result<Injected>,
}

/// What a fault injection reports back.
pub struct Injected {
    pub healed_at: Instant,
    pub violations: Vec<String>,
    pub notes: Vec<String>,
}

impl Injected {
    fn healed() -> Injected {
        Injected {
            healed_at: Instant::now(),
            violations: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// Every implemented scenario, in the order a full run takes them.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            number: 1,
            name: "kill-primary-container",
            summary: "docker kill (SIGKILL) of the primary's container, started again once another node leads",
            allowed_promotions: 1,
            inject: kill_primary_container,
        },
        Scenario {
            number: 2,
            name: "kill-primary-postgres",
            summary: "kill -9 of the primary's postmaster only",
            allowed_promotions: 1,
            inject: kill_primary_postgres,
        },
        Scenario {
            number: 3,
            name: "kill-primary-agent",
            summary: "kill -9 of the primary's agent process (the child of the container's PID 1) from the host",
            allowed_promotions: 1,
            inject: kill_primary_agent,
        },
        Scenario {
            number: 4,
            name: "pause-primary",
            summary: "docker pause of the primary until another node leads (longer than the TTL), then unpause",
            allowed_promotions: 1,
            inject: pause_primary,
        },
        Scenario {
            number: 5,
            name: "sigstop-primary-agent",
            summary: "SIGSTOP of the primary's agent (from the host) until another node leads, then SIGCONT",
            allowed_promotions: 1,
            inject: sigstop_primary_agent,
        },
        Scenario {
            number: 6,
            name: "isolate-primary",
            summary: "docker network disconnect of the primary until another node leads, then reconnect",
            allowed_promotions: 1,
            inject: isolate_primary,
        },
        Scenario {
            number: 7,
            name: "primary-cut-from-etcd",
            summary: "iptables in the primary's network namespace drops its etcd traffic until another node leads",
            allowed_promotions: 1,
            inject: primary_cut_from_etcd,
        },
        Scenario {
            number: 8,
            name: "replication-cut",
            summary: "iptables in the primary's network namespace drops the replicas' Postgres connections for 3 TTLs",
            allowed_promotions: 1,
            inject: replication_cut,
        },
        Scenario {
            number: 9,
            name: "etcd-quorum-loss",
            summary: "stop 2 of 3 etcd members for 3 TTLs, then start them",
            allowed_promotions: 1,
            inject: etcd_quorum_loss,
        },
        Scenario {
            number: 10,
            name: "kill-etcd-leader",
            summary: "docker kill of the etcd Raft leader, started again after 2 TTLs",
            allowed_promotions: 1,
            inject: kill_etcd_leader,
        },
        Scenario {
            number: 11,
            name: "netem-delay-loss",
            summary: "200 ms delay and 10 % loss on every packet the primary sends (tc netem's semantics, on NFQUEUE) for 4 TTLs: no failover",
            allowed_promotions: 0,
            inject: netem_delay_loss,
        },
        Scenario {
            number: 12,
            name: "lagging-replica-primary-dies",
            summary: "replay paused on the replica outside the synchronous set, then docker kill of the primary: the lagging one is not promoted",
            allowed_promotions: 1,
            inject: lagging_replica_primary_dies,
        },
        Scenario {
            number: 13,
            name: "candidate-killed-after-key",
            summary: "docker kill of the primary, then of the replica that takes the leader key as soon as etcd shows it; both started again",
            allowed_promotions: 2,
            inject: candidate_killed_after_key,
        },
        Scenario {
            number: 14,
            name: "switchover-concurrent",
            summary: "two concurrent planned switchovers to different replicas under load",
            allowed_promotions: 1,
            inject: switchover_concurrent,
        },
        Scenario {
            number: 15,
            name: "rolling-restart",
            summary: "docker stop (SIGINT) and start of every node, replicas first",
            allowed_promotions: 3,
            inject: rolling_restart,
        },
        Scenario {
            number: 16,
            name: "replica-datadir-wiped",
            summary: "a stopped replica's data directory removed: it clones again and never answers as primary first",
            allowed_promotions: 0,
            inject: replica_datadir_wiped,
        },
        Scenario {
            number: 17,
            name: "ten-primary-kills",
            summary: "docker kill of the primary ten times in a row, each after a synchronous standby is back",
            allowed_promotions: 10,
            inject: ten_primary_kills,
        },
        Scenario {
            number: 18,
            name: "stop-all-during-rewind",
            summary: "docker kill of the primary; when it starts again, its pg_rewind is frozen (SIGSTOP) and every node gets SIGINT at once (a platform restart), the rewind let go on: its agent waits for it within shutdown_timeout and says how it ended; all started again, the member never runs a half-rewound directory and streams",
            allowed_promotions: 2,
            inject: stop_all_during_rewind,
        },
        Scenario {
            number: 19,
            name: "stop-all-during-clone",
            summary: "a replica's data directory removed; its pg_basebackup is frozen (SIGSTOP), every node gets SIGINT at once and the copy is let go on: its agent waits for it within shutdown_timeout; all started again, a partial copy is removed and cloned again, never started",
            allowed_promotions: 1,
            inject: stop_all_during_clone,
        },
        Scenario {
            number: 20,
            name: "kill-all-during-rewind",
            summary: "as 18, but every node is killed (SIGKILL, a platform crash) while the pg_rewind is frozen: the member finds its marker, reports rewind_pending and rewinds once the new leader's Postgres runs",
            allowed_promotions: 2,
            inject: kill_all_during_rewind,
        },
    ]
}

/// Implemented scenarios the CI test leaves out, with the reason.
pub const NOT_IN_CI: &[(u8, &str)] = &[];

/// Scenarios of the issue not implemented yet (number, name).
pub const MISSING: &[(u8, &str)] = &[];

/// One node's view from its API: (status of /primary, its JSON body).
fn node_state(cluster: &Cluster, node: &str) -> Option<(u16, serde_json::Value)> {
    let (status, body) =
        http::get(cluster.api(node)?, "/primary", Duration::from_millis(800)).ok()?;
    Some((status, serde_json::from_str(&body).ok()?))
}

/// The one node answering 200 on /primary, if exactly one does.
pub fn sole_primary(cluster: &Cluster) -> Option<String> {
    let primaries: Vec<&str> = NODES
        .iter()
        .copied()
        .filter(|n| cluster.answers_200(n, "/primary"))
        .collect();
    (primaries.len() == 1).then(|| primaries[0].to_string())
}

/// Converged: one primary, every other node streaming from it, all on the
/// primary's timeline.
pub fn converged(cluster: &Cluster) -> Option<String> {
    let mut primary = None;
    let mut timelines = Vec::new();
    for node in NODES {
        let (status, body) = node_state(cluster, node)?;
        timelines.push(body["timeline"].as_u64()?);
        if status == 200 {
            if primary.is_some() {
                return None;
            }
            primary = Some(node.to_string());
        } else if body["replication_state"].as_str() != Some("streaming")
            || !cluster.answers_200(node, "/replica?replication_state=streaming")
        {
            return None;
        }
    }
    timelines.windows(2).all(|w| w[0] == w[1]).then_some(())?;
    primary
}

/// Converged and, in a synchronous mode, a replica answering 200 on /sync:
/// the state in which a fault may be injected.
pub fn ready(cluster: &Cluster, timeout: Duration) -> Result<String> {
    wait_for(
        "a converged cluster with a synchronous standby",
        timeout,
        || {
            let primary = converged(cluster)?;
            if cluster.sync_mode != "off"
                && !NODES
                    .iter()
                    .any(|n| *n != primary && cluster.answers_200(n, "/sync"))
            {
                return None;
            }
            Some(primary)
        },
    )
}

fn primary_now(cluster: &Cluster) -> Result<String> {
    sole_primary(cluster).ok_or_else(|| anyhow!("no single primary before the fault"))
}

/// Waits until a node other than `old` answers 200 on /primary.
fn new_primary(cluster: &Cluster, old: &str, timeout: Duration) -> Result<String> {
    wait_for(&format!("a primary other than {old}"), timeout, || {
        NODES
            .iter()
            .find(|n| **n != old && cluster.answers_200(n, "/primary"))
            .map(|n| n.to_string())
    })
}

fn kill_primary_container(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    cluster.docker_on(&["kill"], &p)?;
    let np = new_primary(cluster, &p, Duration::from_secs(60));
    cluster.docker_on(&["start"], &p)?;
    let mut inj = Injected::healed();
    match np {
        Ok(np) => inj.notes.push(format!("{p} killed, {np} promoted")),
        Err(e) => inj.violations.push(format!("after killing {p}: {e}")),
    }
    Ok(inj)
}

fn kill_primary_postgres(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    run_ok(&mut crate::cluster::docker(&[
        "exec",
        cluster.container(&p),
        "sh",
        "-c",
        "kill -9 $(head -n1 /var/lib/pgha/data/postmaster.pid)",
    ]))?;
    let mut inj = Injected::healed();
    inj.notes.push(format!("postmaster of {p} killed"));
    Ok(inj)
}

fn kill_primary_agent(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    let pid = agent_host_pid(cluster, &p)?;
    run_ok(std::process::Command::new("kill").args(["-9", &pid]))?;
    let np = new_primary(cluster, &p, Duration::from_secs(60));
    let mut inj = Injected::healed();
    // PID 1 exits with the agent, and the container with it; start it again.
    let ended = wait_for(
        "the container to end with its agent",
        Duration::from_secs(20),
        || {
            (cluster
                .docker_on(&["inspect", "-f", "{{.State.Running}}"], &p)
                .ok()?
                == "false")
                .then_some(())
        },
    );
    if ended.is_err() {
        inj.notes
            .push(format!("{p}'s container kept running without its agent"));
    }
    let _ = cluster.docker_on(&["start"], &p);
    inj.healed_at = Instant::now();
    match np {
        Ok(np) => inj.notes.push(format!("{p}'s agent killed, {np} promoted")),
        Err(e) => inj
            .violations
            .push(format!("after killing {p}'s agent: {e}")),
    }
    Ok(inj)
}

fn pause_primary(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    cluster.docker_on(&["pause"], &p)?;
    let paused = Instant::now();
    let np = new_primary(cluster, &p, Duration::from_secs(60));
    // Frozen longer than the TTL in any case, and a moment after the
    // promotion, so the zombie wakes up next to a new primary.
    let min = cluster.timing.ttl + Duration::from_secs(1);
    std::thread::sleep(min.saturating_sub(paused.elapsed()) + Duration::from_millis(500));
    cluster.docker_on(&["unpause"], &p)?;
    let mut inj = Injected::healed();
    match np {
        Ok(np) => inj.notes.push(format!(
            "{p} paused {:.1} s, {np} promoted",
            paused.elapsed().as_secs_f64()
        )),
        Err(e) => inj.violations.push(format!("while {p} was paused: {e}")),
    }
    Ok(inj)
}

fn isolate_primary(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    let net = cluster.network().to_string();
    cluster.docker_on(&["network", "disconnect", &net], &p)?;
    let cut = Instant::now();
    let np = new_primary(cluster, &p, Duration::from_secs(60));
    let min = cluster.timing.ttl + Duration::from_secs(1);
    std::thread::sleep(min.saturating_sub(cut.elapsed()) + Duration::from_millis(500));
    // Back under its service name, the alias compose gave it.
    cluster.docker_on(&["network", "connect", "--alias", &p, &net], &p)?;
    let mut inj = Injected::healed();
    match np {
        Ok(np) => inj.notes.push(format!(
            "{p} isolated {:.1} s, {np} promoted",
            cut.elapsed().as_secs_f64()
        )),
        Err(e) => inj.violations.push(format!("while {p} was isolated: {e}")),
    }
    Ok(inj)
}

fn etcd_quorum_loss(cluster: &Cluster) -> Result<Injected> {
    let stopped = ["etcd2", "etcd3"];
    for e in stopped {
        cluster.docker_on(&["stop", "-t", "1"], e)?;
    }
    std::thread::sleep(cluster.timing.ttl * 3);
    let writable: Vec<&str> = NODES
        .iter()
        .copied()
        .filter(|n| cluster.answers_200(n, "/primary"))
        .collect();
    for e in stopped {
        cluster.docker_on(&["start"], e)?;
    }
    let mut inj = Injected::healed();
    inj.notes.push(format!(
        "3 TTLs without etcd quorum; nodes answering /primary at the end: {writable:?}"
    ));
    Ok(inj)
}

/// The etcd member that is Raft leader, from the members' maintenance API.
fn etcd_leader(cluster: &Cluster) -> Result<&'static str> {
    for e in ETCDS {
        let ip = cluster.docker_on(
            &[
                "inspect",
                "-f",
                &format!(
                    "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}",
                    cluster.network()
                ),
            ],
            e,
        )?;
        let Ok(ip) = ip.parse() else { continue };
        let Ok((200, body)) = http::request(
            SocketAddr::new(ip, 2379),
            "POST",
            "/v3/maintenance/status",
            &[],
            Some("{}"),
            Duration::from_secs(1),
        ) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body)?;
        if v["header"]["member_id"] == v["leader"] {
            return Ok(e);
        }
    }
    bail!("no etcd member says it is the leader")
}

fn kill_etcd_leader(cluster: &Cluster) -> Result<Injected> {
    let leader = etcd_leader(cluster)?;
    cluster.docker_on(&["kill"], leader)?;
    std::thread::sleep(cluster.timing.ttl * 2);
    cluster.docker_on(&["start"], leader)?;
    let mut inj = Injected::healed();
    inj.notes.push(format!("{leader} was the etcd leader"));
    Ok(inj)
}

fn switchover_concurrent(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    let api = cluster.api(&p).context("primary's address")?;
    let candidates: Vec<String> = NODES
        .iter()
        .filter(|n| **n != p)
        .map(|n| n.to_string())
        .collect();
    let auth = format!("Bearer {API_TOKEN}");
    let answers: Vec<(String, std::io::Result<(u16, String)>)> = std::thread::scope(|s| {
        let handles: Vec<_> = candidates
            .iter()
            .map(|c| {
                let (auth, p) = (&auth, &p);
                s.spawn(move || {
                    let body = format!("{{\"leader\":\"{p}\",\"candidate\":\"{c}\"}}");
                    let r = http::request(
                        api,
                        "POST",
                        "/switchover",
                        &[("Authorization", auth)],
                        Some(&body),
                        Duration::from_secs(30),
                    );
                    (c.clone(), r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut inj = Injected::healed();
    let ok: Vec<&String> = answers
        .iter()
        .filter(|(_, r)| matches!(r, Ok((200, _))))
        .map(|(c, _)| c)
        .collect();
    for (c, r) in &answers {
        inj.notes.push(match r {
            Ok((s, body)) => format!("switchover to {c}: {s} {}", body.trim()),
            Err(e) => format!("switchover to {c}: {e}"),
        });
    }
    if ok.len() != 1 {
        inj.violations.push(format!(
            "{} of the two concurrent switchovers succeeded",
            ok.len()
        ));
    }
    match new_primary(cluster, &p, Duration::from_secs(30)) {
        Ok(np) if ok.first().is_some_and(|c| **c != np) => inj.violations.push(format!(
            "switchover to {} answered 200 but {np} leads",
            ok[0]
        )),
        Ok(_) => {}
        Err(e) => inj.violations.push(format!("after the switchover: {e}")),
    }
    inj.healed_at = Instant::now();
    Ok(inj)
}

fn rolling_restart(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    let mut order: Vec<&str> = NODES.iter().copied().filter(|n| *n != p).collect();
    order.push(&p);
    let mut inj = Injected::healed();
    for node in order {
        ready(cluster, Duration::from_secs(90))?;
        let stopping = Instant::now();
        cluster.docker_on(&["stop", "-t", "60"], node)?;
        inj.notes.push(format!(
            "{node} stopped by SIGINT in {:.1} s",
            stopping.elapsed().as_secs_f64()
        ));
        let code = cluster.docker_on(&["inspect", "-f", "{{.State.ExitCode}}"], node)?;
        if code != "0" {
            inj.violations
                .push(format!("{node} exited {code} on SIGINT instead of 0"));
        }
        cluster.docker_on(&["start"], node)?;
    }
    inj.healed_at = Instant::now();
    Ok(inj)
}

fn ten_primary_kills(cluster: &Cluster) -> Result<Injected> {
    let mut inj = Injected::healed();
    for round in 1..=10 {
        let p = match ready(cluster, Duration::from_secs(90)) {
            Ok(p) => p,
            Err(e) => {
                inj.violations.push(format!(
                    "before kill {round}: {e} (primaries: {:?})",
                    primaries(cluster)
                ));
                break;
            }
        };
        cluster.docker_on(&["kill"], &p)?;
        let np = new_primary(cluster, &p, Duration::from_secs(60));
        cluster.docker_on(&["start"], &p)?;
        match np {
            Ok(np) => inj.notes.push(format!("kill {round}: {p} -> {np}")),
            Err(e) => {
                inj.violations.push(format!("kill {round} of {p}: {e}"));
                break;
            }
        }
    }
    inj.healed_at = Instant::now();
    Ok(inj)
}

fn primaries(cluster: &Cluster) -> Vec<&'static str> {
    NODES
        .iter()
        .copied()
        .filter(|n| cluster.answers_200(n, "/primary"))
        .collect()
}

/// Runs one scenario once: workload, fault, convergence, checker.
pub fn run_once(cluster: &Cluster, scenario: &Scenario, repeat: usize) -> RunResult {
    let failed = |why: String| RunResult {
        scenario: scenario.name.to_string(),
        repeat,
        writers: Vec::new(),
        lost: 0,
        split_brain_events: 0,
        promotions: 0,
        converged: false,
        converged_after_ms: None,
        violations: vec![why],
        notes: Vec::new(),
    };
    if let Err(e) = ready(cluster, Duration::from_secs(120)) {
        let result = failed(format!("cluster not ready before the fault: {e:#}"));
        save_diagnostics(cluster, &result);
        return result;
    }
    let prober = Prober::start(cluster.addresses.clone());
    let tag = format!("s{}r{repeat}p{}", scenario.number, std::process::id());
    // The third writer goes through the router of a node that is not the
    // primary: its connections cross to the primary's Postgres.
    let leading = primaries(cluster);
    let router_node = NODES
        .iter()
        .copied()
        .find(|n| !leading.contains(n))
        .unwrap_or(NODES[0]);
    let writers = vec![
        Writer::start(
            &format!("{tag}-libpq"),
            Target::MultiHost(cluster.addresses.clone()),
        ),
        Writer::start(
            &format!("{tag}-haproxy"),
            Target::Haproxy(cluster.primary_port),
        ),
        Writer::start(
            &format!("{tag}-router"),
            Target::Router(cluster.addresses.clone(), router_node),
        ),
    ];
    let warm = wait_for("every writer acknowledged", Duration::from_secs(30), || {
        writers
            .iter()
            .all(|w| w.log().last_ack().is_some())
            .then_some(())
    });
    if let Err(e) = warm {
        return failed(format!("workload did not start: {e:#}"));
    }
    std::thread::sleep(Duration::from_secs(1));
    let run_started_ms = workload::wall_ms();
    let fault_at = Instant::now();
    eprintln!("chaos: {} (repeat {repeat}): injecting", scenario.name);
    let injected = match (scenario.inject)(cluster) {
        Ok(i) => i,
        Err(e) => Injected {
            healed_at: Instant::now(),
            violations: vec![format!("fault injection failed: {e:#}")],
            notes: Vec::new(),
        },
    };
    // Converged: the topology is right and every writer had an insert
    // acknowledged after it was (an API snapshot may look right a moment
    // before Postgres takes writes again).
    let converged_after = wait_for("convergence", CONVERGE_WITHIN, || converged(cluster))
        .ok()
        .and_then(|_| {
            let seen = Instant::now();
            let left = CONVERGE_WITHIN.saturating_sub(injected.healed_at.elapsed());
            wait_for(
                "writes after convergence",
                left.max(Duration::from_secs(5)),
                || {
                    writers
                        .iter()
                        .all(|w| w.log().last_ack().is_some_and(|a| a > seen))
                        .then_some(())
                },
            )
            .ok()
        })
        .map(|_| injected.healed_at.elapsed());
    let logs: Vec<_> = writers.into_iter().map(Writer::stop).collect();
    let rounds = prober.stop();

    let (rows, history) = match read_outcome(cluster, &logs) {
        Ok(v) => v,
        Err(e) => return failed(format!("reading the result from the primary: {e:#}")),
    };
    let ev = Evidence {
        writers: logs,
        rounds,
        rows,
        history,
        run_started_ms,
        fault_at,
        healed_at: injected.healed_at,
        converged_after,
        allowed_promotions: scenario.allowed_promotions,
        sync: cluster.sync_mode != "off",
    };
    let mut result = check::judge(scenario.name, repeat, &ev);
    result.violations.extend(injected.violations);
    result.notes.extend(injected.notes);
    if !result.passed() {
        save_diagnostics(cluster, &result);
    }
    result
}

/// On a failed run: every node's API state and the tail of every node's log,
/// under chaos-tests/results/failure-<scenario>-<repeat>.log.
fn save_diagnostics(cluster: &Cluster, result: &RunResult) {
    let mut text = format!("{} #{}\n", result.scenario, result.repeat);
    for v in &result.violations {
        text.push_str(&format!("violation: {v}\n"));
    }
    for n in &result.notes {
        text.push_str(&format!("note: {n}\n"));
    }
    // A short form on stderr too: CI keeps the output, not the file.
    let mut brief = String::new();
    for node in NODES {
        let container = cluster
            .docker_on(
                &[
                    "inspect",
                    "-f",
                    "running={{.State.Running}} exit={{.State.ExitCode}} restarts={{.RestartCount}} started={{.State.StartedAt}}",
                ],
                node,
            )
            .unwrap_or_else(|e| format!("inspect failed: {e:#}"));
        let state = node_state(cluster, node);
        let line = match &state {
            Some((code, v)) => format!(
                "/primary {code}, role {}, state {}, timeline {}, replication_state {}, leader {}",
                v["role"], v["state"], v["timeline"], v["replication_state"], v["leader"]
            ),
            None => "API: no answer".into(),
        };
        brief.push_str(&format!("chaos:   {node}: container {container}; {line}\n"));
        let full = state
            .map(|(s, v)| format!("{s} {v}"))
            .unwrap_or_else(|| "no answer".into());
        text.push_str(&format!("\n=== {node} ({container}) /primary: {full}\n"));
        let logs = crate::cluster::run(&mut cluster.compose(&[
            "logs",
            "--no-color",
            "--tail",
            "150",
            node,
        ]));
        let logs = String::from_utf8_lossy(&logs.stdout);
        // Its last warnings and errors, the likeliest reason it is stuck.
        let worrying: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("FATAL"))
            .collect();
        for l in &worrying[worrying.len().saturating_sub(6)..] {
            let l: String = l.chars().take(400).collect();
            brief.push_str(&format!("chaos:     {l}\n"));
        }
        text.push_str(&logs);
    }
    eprint!("{brief}");
    let dir = crate::report::results_dir();
    let path = dir.join(format!("failure-{}-{}.log", result.scenario, result.repeat));
    let _ = std::fs::create_dir_all(&dir);
    match std::fs::write(&path, text) {
        Ok(()) => eprintln!("chaos: diagnostics in {}", path.display()),
        Err(e) => eprintln!("chaos: writing diagnostics: {e}"),
    }
}

/// The writers' rows and the promotion history, from the current primary.
fn read_outcome(
    cluster: &Cluster,
    logs: &[workload::WriterLog],
) -> Result<(Vec<StoredRow>, Vec<Promotion>)> {
    let primary = wait_for("a primary to read from", Duration::from_secs(30), || {
        sole_primary(cluster)
    })?;
    let names: Vec<String> = logs.iter().map(|l| format!("'{}'", l.writer)).collect();
    let out = cluster.psql_in(
        &primary,
        &format!(
            "SELECT writer, seq, node, timeline, extract(epoch FROM ts)::float8 * 1000 \
             FROM {} WHERE writer IN ({})",
            workload::TABLE,
            names.join(",")
        ),
    )?;
    let mut rows = Vec::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('|').collect();
        if f.len() != 5 {
            bail!("unexpected psql line {line:?}");
        }
        rows.push(StoredRow {
            writer: f[0].to_string(),
            seq: f[1].parse()?,
            node: f[2].to_string(),
            timeline: f[3].parse()?,
            server_ms: f[4].parse()?,
        });
    }
    let history = cluster
        .get_json(&primary, "/history")
        .context("GET /history")?;
    let history = history
        .as_array()
        .context("/history is an array")?
        .iter()
        .map(|h| Promotion {
            kind: h["kind"].as_str().unwrap_or("failover").to_string(),
            timeline: h["timeline"].as_u64().map(|t| t as u32),
            at_ms: h["at_ms"].as_u64().unwrap_or(0),
            new_leader: h["new_leader"].as_str().unwrap_or("").to_string(),
        })
        .collect();
    Ok((rows, history))
}

/// Creates the writes table through HAProxy's primary port.
pub fn prepare(cluster: &Cluster) -> Result<()> {
    let primary = ready(cluster, Duration::from_secs(180))?;
    cluster.psql_in(&primary, workload::CREATE_TABLE)?;
    Ok(())
}

/// The agent's PID on the host. PID 1 of a node's container is the reaper
/// (`pgha run` as init: reaps orphans, forwards signals); the agent proper is
/// its child running the same command.
fn agent_host_pid(cluster: &Cluster, node: &str) -> Result<String> {
    let init = cluster.docker_on(&["inspect", "-f", "{{.State.Pid}}"], node)?;
    if init.parse::<u32>().map_or(true, |p| p == 0) {
        bail!("{node} has no running PID 1 ({init:?})");
    }
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
        .with_context(|| format!("children of {node}'s PID 1 ({init})"))?;
    for child in children.split_whitespace() {
        let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"pgha")) && args.get(1) == Some(&&b"run"[..]) {
            return Ok(child.to_string());
        }
    }
    bail!("no `pgha run` child of {node}'s PID 1 ({init}): {children:?}")
}

fn sigstop_primary_agent(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    let pid = agent_host_pid(cluster, &p)?;
    // Only the agent stops: PID 1, Postgres and the fence guard keep running.
    run_ok(std::process::Command::new("kill").args(["-STOP", &pid]))?;
    let stopped = Instant::now();
    let np = new_primary(cluster, &p, Duration::from_secs(60));
    let min = cluster.timing.ttl + Duration::from_secs(1);
    std::thread::sleep(min.saturating_sub(stopped.elapsed()) + Duration::from_millis(500));
    run_ok(std::process::Command::new("kill").args(["-CONT", &pid]))?;
    let mut inj = Injected::healed();
    match np {
        Ok(np) => inj.notes.push(format!(
            "{p}'s agent stopped {:.1} s, {np} promoted",
            stopped.elapsed().as_secs_f64()
        )),
        Err(e) => inj
            .violations
            .push(format!("while {p}'s agent was stopped: {e}")),
    }
    Ok(inj)
}

/// The replicas of the published synchronous set and the others.
fn sync_split(cluster: &Cluster, primary: &str) -> (Vec<&'static str>, Vec<&'static str>) {
    NODES
        .iter()
        .copied()
        .filter(|n| *n != primary)
        .partition(|n| cluster.answers_200(n, "/sync"))
}

fn lagging_replica_primary_dies(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    let (_, others) = sync_split(cluster, &p);
    let lagging = *others
        .first()
        .context("no replica outside the synchronous set")?;
    cluster.psql_in(lagging, "SELECT pg_wal_replay_pause()")?;
    // Let the writers move the primary ahead of the paused replay.
    std::thread::sleep(Duration::from_secs(2));
    cluster.docker_on(&["kill"], &p)?;
    let np = new_primary(cluster, &p, Duration::from_secs(60));
    let mut inj = Injected::healed();
    match &np {
        Ok(np) if np == lagging => inj
            .violations
            .push(format!("{lagging}, whose replay was paused, was promoted")),
        Ok(np) => inj
            .notes
            .push(format!("{p} killed with {lagging} paused, {np} promoted")),
        Err(e) => inj.violations.push(format!("after killing {p}: {e}")),
    }
    // Replay must run again, or the next scenario starts with a paused replica.
    let resumed = wait_for("replay resumed", Duration::from_secs(30), || {
        cluster
            .psql_in(
                lagging,
                "SELECT pg_wal_replay_resume(); SELECT pg_is_wal_replay_paused()",
            )
            .ok()
            .filter(|out| out.lines().last() == Some("f"))
    });
    if let Err(e) = resumed {
        inj.violations.push(format!("{lagging}: {e}"));
    }
    cluster.docker_on(&["start"], &p)?;
    inj.healed_at = Instant::now();
    Ok(inj)
}

/// Removes a stopped node's data directory: its own volume, emptied with
/// the node's own image.
fn wipe_data_dir(cluster: &Cluster, node: &str) -> Result<()> {
    let image = cluster.docker_on(&["inspect", "-f", "{{.Config.Image}}"], node)?;
    run_ok(&mut crate::cluster::docker(&[
        "run",
        "--rm",
        "--user",
        "root",
        "--entrypoint",
        "rm",
        "-v",
        &format!("{}_{node}:/var/lib/pgha", cluster.name),
        &image,
        "-rf",
        "/var/lib/pgha/data",
    ]))?;
    Ok(())
}

/// Stops a replica, removes its data directory and starts it again (it
/// clones anew); returns its name.
fn wipe_a_replica(cluster: &Cluster) -> Result<&'static str> {
    let p = primary_now(cluster)?;
    let r = NODES
        .iter()
        .copied()
        .find(|n| *n != p)
        .context("a replica")?;
    cluster.docker_on(&["stop", "-t", "30"], r)?;
    wipe_data_dir(cluster, r)?;
    cluster.docker_on(&["start"], r)?;
    Ok(r)
}

fn replica_datadir_wiped(cluster: &Cluster) -> Result<Injected> {
    let r = wipe_a_replica(cluster)?;
    let mut inj = Injected::healed();
    let mut was_primary = false;
    let cloned = wait_for(
        &format!("{r} streaming again"),
        Duration::from_secs(90),
        || {
            was_primary |= cluster.answers_200(r, "/primary");
            cluster
                .answers_200(r, "/replica?replication_state=streaming")
                .then_some(())
        },
    );
    if was_primary {
        inj.violations
            .push(format!("{r} answered as primary before it had cloned"));
    }
    match cloned {
        Ok(()) => inj.notes.push(format!("{r} wiped and cloned again")),
        Err(e) => inj.violations.push(format!("{e}")),
    }
    inj.healed_at = Instant::now();
    Ok(inj)
}

/// Standard base64, as etcd's JSON gateway encodes keys and values.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        acc = (acc << 6) | ALPHABET.iter().position(|a| *a == c)? as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The value of the cluster's leader key, read through any etcd member's
/// JSON gateway; None when no member answers or the key is absent.
fn leader_key(etcd: &[SocketAddr]) -> Option<String> {
    // "/pgha/compose/leader" (namespace /pgha, scope compose).
    const KEY: &str = "L3BnaGEvY29tcG9zZS9sZWFkZXI=";
    for addr in etcd {
        let Ok((200, body)) = http::request(
            *addr,
            "POST",
            "/v3/kv/range",
            &[],
            Some(&format!("{{\"key\":\"{KEY}\"}}")),
            Duration::from_millis(300),
        ) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let value = v["kvs"][0]["value"].as_str()?;
        return String::from_utf8(base64_decode(value)?).ok();
    }
    None
}

fn candidate_killed_after_key(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    let mut etcd = Vec::new();
    for e in ETCDS {
        let ip = cluster.docker_on(
            &[
                "inspect",
                "-f",
                &format!(
                    "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}",
                    cluster.network()
                ),
            ],
            e,
        )?;
        etcd.push(SocketAddr::new(ip.parse().context("etcd address")?, 2379));
    }
    let before = leader_key(&etcd);
    if before.as_deref().map(|v| v.trim_matches('"')) != Some(p.as_str()) {
        bail!("the leader key holds {before:?}, the primary is {p}");
    }
    cluster.docker_on(&["kill"], &p)?;
    let killed = Instant::now();
    let mut inj = Injected::healed();
    let candidate = wait_for(
        "another node's name in the leader key",
        Duration::from_secs(60),
        || {
            let v = leader_key(&etcd)?;
            let v = v.trim_matches('"');
            NODES
                .iter()
                .find(|n| **n == v && **n != p)
                .map(|n| n.to_string())
        },
    );
    match candidate {
        Ok(c) => {
            let took = killed.elapsed();
            let was_primary = cluster.answers_200(&c, "/primary");
            cluster.docker_on(&["kill"], &c)?;
            inj.notes.push(format!(
                "{p} killed; {c} took the key {:.1} s later and was killed (answering /primary: {was_primary})",
                took.as_secs_f64()
            ));
            std::thread::sleep(Duration::from_secs(1));
            cluster.docker_on(&["start"], &c)?;
        }
        Err(e) => inj.violations.push(format!("after killing {p}: {e}")),
    }
    cluster.docker_on(&["start"], &p)?;
    inj.healed_at = Instant::now();
    Ok(inj)
}

/// Commands run in a node's network namespace with the host's tools
/// (`nsenter -n`), so the image needs neither iptables nor NET_ADMIN. The
/// undo commands run on drop, also when the scenario fails midway.
struct NetnsRules {
    pid: String,
    undo: Vec<Vec<String>>,
}

impl NetnsRules {
    fn new(cluster: &Cluster, node: &str) -> Result<NetnsRules> {
        let pid = cluster.docker_on(&["inspect", "-f", "{{.State.Pid}}"], node)?;
        Ok(NetnsRules {
            pid,
            undo: Vec::new(),
        })
    }

    fn exec(&self, cmd: &[&str]) -> Result<String> {
        run_ok(
            std::process::Command::new("nsenter")
                .args(["-t", &self.pid, "-n", "--"])
                .args(cmd),
        )
    }

    /// `iptables`/`ip6tables -I <rule>`, deleted again on drop.
    fn insert(&mut self, program: &str, rule: &[&str]) -> Result<()> {
        let mut add = vec![program, "-I"];
        add.extend_from_slice(rule);
        self.exec(&add)?;
        let mut del = vec![program.to_string(), "-D".to_string()];
        del.extend(rule.iter().map(|r| r.to_string()));
        self.undo.push(del);
        Ok(())
    }

    fn heal(&mut self) -> Result<()> {
        while let Some(cmd) = self.undo.pop() {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            self.exec(&args)?;
        }
        Ok(())
    }
}

impl Drop for NetnsRules {
    fn drop(&mut self) {
        if let Err(e) = self.heal() {
            eprintln!("chaos: removing network rules: {e:#}");
        }
    }
}

fn primary_cut_from_etcd(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    let mut rules = NetnsRules::new(cluster, &p)?;
    for program in ["iptables", "ip6tables"] {
        rules.insert(
            program,
            &["OUTPUT", "-p", "tcp", "--dport", "2379", "-j", "DROP"],
        )?;
        rules.insert(
            program,
            &["INPUT", "-p", "tcp", "--sport", "2379", "-j", "DROP"],
        )?;
    }
    let cut = Instant::now();
    let np = new_primary(cluster, &p, Duration::from_secs(60));
    let min = cluster.timing.ttl + Duration::from_secs(1);
    std::thread::sleep(min.saturating_sub(cut.elapsed()) + Duration::from_millis(500));
    rules.heal()?;
    let mut inj = Injected::healed();
    match np {
        Ok(np) => inj.notes.push(format!(
            "{p} cut from etcd {:.1} s, {np} promoted",
            cut.elapsed().as_secs_f64()
        )),
        Err(e) => inj
            .violations
            .push(format!("while {p} was cut from etcd: {e}")),
    }
    Ok(inj)
}

/// A node's addresses on the cluster network, IPv4 and IPv6.
fn node_addresses(cluster: &Cluster, node: &str) -> Result<Vec<String>> {
    let out = cluster.docker_on(
        &[
            "inspect",
            "-f",
            &format!(
                "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}} {{{{.GlobalIPv6Address}}}}{{{{end}}}}",
                cluster.network()
            ),
        ],
        node,
    )?;
    Ok(out.split_whitespace().map(str::to_string).collect())
}

fn replication_cut(cluster: &Cluster) -> Result<Injected> {
    let p = primary_now(cluster)?;
    let mut rules = NetnsRules::new(cluster, &p)?;
    for r in NODES.iter().filter(|n| **n != p) {
        for addr in node_addresses(cluster, r)? {
            let program = if addr.contains(':') {
                "ip6tables"
            } else {
                "iptables"
            };
            rules.insert(
                program,
                &[
                    "INPUT", "-p", "tcp", "-s", &addr, "--dport", "5433", "-j", "DROP",
                ],
            )?;
            rules.insert(
                program,
                &[
                    "OUTPUT", "-p", "tcp", "-d", &addr, "--sport", "5433", "-j", "DROP",
                ],
            )?;
        }
    }
    std::thread::sleep(cluster.timing.ttl * 2);
    // What the primary believes of its standbys while they are black-holed.
    let walsenders = cluster
        .psql_in(
            &p,
            "SELECT string_agg(format('%s %s %s reply %s s ago', application_name, state, sync_state, \
             round(extract(epoch FROM now() - reply_time)::numeric, 1)), '; ') FROM pg_stat_replication",
        )
        .unwrap_or_else(|e| format!("{e:#}"));
    let sync = cluster
        .get_json(&p, "/primary")
        .map(|v| {
            format!(
                "synchronous_standbys {} sync_fallback {}",
                v["synchronous_standbys"], v["sync_fallback"]
            )
        })
        .unwrap_or_default();
    std::thread::sleep(cluster.timing.ttl);
    let primaries = primaries(cluster);
    rules.heal()?;
    let mut inj = Injected::healed();
    inj.notes.push(format!(
        "2 TTLs into the cut, {p} has walsenders: {walsenders}; {sync}"
    ));
    inj.notes.push(format!(
        "replication to {p} cut for 3 TTLs; answering /primary at the end: {primaries:?}"
    ));
    Ok(inj)
}

/// The NFQUEUE the netem stand-in serves, in the primary's namespace.
const NETEM_QUEUE: u16 = 11;

/// TCP connect times from `from`'s network namespace to `to`'s API port:
/// (median, slowest, failed attempts) of `samples`. A connect is one round
/// trip (SYN, SYN-ACK), plus a retransmission when one of them is lost.
fn connect_rtt(
    cluster: &Cluster,
    from: &str,
    to: &str,
    samples: usize,
) -> Result<(Duration, Duration, usize)> {
    let pid: u32 = cluster
        .docker_on(&["inspect", "-f", "{{.State.Pid}}"], from)?
        .parse()
        .context("container PID")?;
    let addr = cluster.api(to).context("address of the primary")?;
    let mut times = netem::in_netns(pid, move || {
        (0..samples)
            .map(|_| {
                let t = Instant::now();
                let ok =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(4)).is_ok();
                let took = t.elapsed();
                std::thread::sleep(Duration::from_millis(50));
                ok.then_some(took)
            })
            .collect::<Vec<_>>()
    })?;
    let failed = times.iter().filter(|t| t.is_none()).count();
    let mut ok: Vec<Duration> = times.drain(..).flatten().collect();
    ok.sort();
    let median = ok.get(ok.len() / 2).copied().unwrap_or_default();
    Ok((median, ok.last().copied().unwrap_or_default(), failed))
}

/// The leader key revision `node` reports (`term` on /primary), retried
/// for a while: under the fault its API answers slowly.
fn term_of(cluster: &Cluster, node: &str) -> Option<u64> {
    wait_for("the node's term", Duration::from_secs(10), || {
        node_state(cluster, node)?.1["term"].as_u64()
    })
    .ok()
}

fn netem_delay_loss(cluster: &Cluster) -> Result<Injected> {
    const DELAY: Duration = Duration::from_millis(200);
    const LOSS: f64 = 0.10;
    let p = primary_now(cluster)?;
    let peer = *NODES.iter().find(|n| **n != p).context("a replica")?;
    let term_before = term_of(cluster, &p);
    // Over the Unix socket, untouched by the fault: a postmaster that
    // started again in between was stopped (by the fence guard) under it.
    let started_sql = "SELECT pg_postmaster_start_time()";
    let postmaster_before = cluster.psql_in(&p, started_sql)?;
    let (rtt_before, _, _) = connect_rtt(cluster, peer, &p, 5)?;
    let mut rules = NetnsRules::new(cluster, &p)?;
    let pid: u32 = rules.pid.parse().context("container PID")?;
    let seed = netem::clock_seed();
    let mut shaper = NetemThread::start(
        pid,
        Netem {
            queue: NETEM_QUEUE,
            delay: DELAY,
            loss: LOSS,
            seed,
        },
    )?;
    let queue = NETEM_QUEUE.to_string();
    for program in ["iptables", "ip6tables"] {
        rules.insert(
            program,
            &[
                "OUTPUT",
                "!",
                "-o",
                "lo",
                "-j",
                "NFQUEUE",
                "--queue-num",
                &queue,
                "--queue-bypass",
            ],
        )?;
    }
    let started = Instant::now();
    let hold = cluster.timing.ttl * 4;
    let mut inj = Injected::healed();
    let mut rtt_during = None;
    let mut other_primary = None;
    let mut inside = None;
    while started.elapsed() < hold {
        if rtt_during.is_none() && started.elapsed() > Duration::from_secs(2) {
            rtt_during = Some(connect_rtt(cluster, peer, &p, 9)?);
        }
        if inside.is_none() && started.elapsed() > hold / 2 {
            // Over the Unix socket: what the primary waits for under the fault.
            inside = Some(
                cluster
                    .psql_in(
                        &p,
                        "SELECT (SELECT string_agg(format('%s %s %s flush lag %s', application_name, state, \
                         sync_state, flush_lag), '; ') FROM pg_stat_replication) || ' | backends waiting: ' || \
                         coalesce((SELECT string_agg(format('%s x%s', wait_event, n), ', ') FROM \
                         (SELECT wait_event, count(*) n FROM pg_stat_activity WHERE wait_event IS NOT NULL \
                         AND backend_type = 'client backend' GROUP BY 1) w), 'none')",
                    )
                    .unwrap_or_else(|e| format!("{e:#}")),
            );
        }
        if other_primary.is_none() {
            other_primary = NODES
                .iter()
                .find(|n| **n != p && cluster.answers_200(n, "/primary"))
                .map(|n| (n.to_string(), started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    rules.heal()?;
    let stats = shaper.stop_now()?;
    inj.healed_at = Instant::now();
    let term_after = term_of(cluster, &p);
    let postmaster_after = wait_for("the primary's Postgres", Duration::from_secs(20), || {
        cluster.psql_in(&p, started_sql).ok()
    })
    .unwrap_or_default();
    let (rtt_after, _, _) = connect_rtt(cluster, peer, &p, 5)?;
    let (median, slowest, failed) = rtt_during.unwrap_or_default();
    inj.notes.push(format!(
        "{p} sent its packets through netem (delay {} ms, loss {:.0} %, seed {seed}) for {:.1} s: \
         {} delayed, {} dropped, at most {} held",
        DELAY.as_millis(),
        LOSS * 100.0,
        hold.as_secs_f64(),
        stats.delayed,
        stats.dropped,
        stats.max_held
    ));
    inj.notes.push(format!(
        "TCP connect {peer} -> {p}: {:.1} ms before, median {:.1} ms (slowest {:.0} ms, {failed} of 9 failed) under netem, {:.1} ms after",
        rtt_before.as_secs_f64() * 1000.0,
        median.as_secs_f64() * 1000.0,
        slowest.as_secs_f64() * 1000.0,
        rtt_after.as_secs_f64() * 1000.0
    ));
    inj.notes.push(format!(
        "leader revision on {p}: {term_before:?} before, {term_after:?} after; half-way: {}",
        inside.unwrap_or_default()
    ));
    if median < DELAY {
        inj.violations.push(format!(
            "the delay did not apply: median connect time {median:?} under netem"
        ));
    }
    if let Some((np, after)) = other_primary {
        inj.violations.push(format!(
            "failover under {} ms delay and {:.0} % loss: {np} answered /primary {:.1} s in",
            DELAY.as_millis(),
            LOSS * 100.0,
            after.as_secs_f64()
        ));
    }
    if postmaster_after != postmaster_before {
        inj.violations.push(format!(
            "{p}'s Postgres was stopped under netem while it kept the leader key (started {postmaster_before}, \
             then {postmaster_after}): the agent did not renew its lease before the fencing deadline"
        ));
    }
    if term_before.is_none() || term_before != term_after {
        inj.violations.push(format!(
            "{p}'s leader revision changed under netem: {term_before:?} -> {term_after:?}"
        ));
    }
    Ok(inj)
}

/// Host PIDs of the processes named `comm` inside `node`'s container (its
/// PID 1 and every descendant), read from the host's /proc.
fn container_processes(init: u32, comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let stat = |pid: u32| -> Option<(String, u32)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces, ends at the last ')'.
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let name = text[open + 1..close].to_string();
        let ppid = text[close + 2..].split_whitespace().nth(1)?.parse().ok()?;
        Some((name, ppid))
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if stat(pid).is_none_or(|(name, _)| name != comm) {
            continue;
        }
        let mut at = pid;
        for _ in 0..64 {
            if at == init {
                found.push(pid);
                break;
            }
            match stat(at) {
                Some((_, ppid)) if ppid > 1 => at = ppid,
                _ => break,
            }
        }
    }
    found
}

/// Waits for a process named `comm` in `node`'s container and freezes it
/// with SIGSTOP, so the job it does is caught part way. Returns its host PID.
fn freeze_in(cluster: &Cluster, node: &str, comm: &str, timeout: Duration) -> Result<u32> {
    let init: u32 = cluster
        .docker_on(&["inspect", "-f", "{{.State.Pid}}"], node)?
        .parse()
        .context("container PID")?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(pid) = container_processes(init, comm).first() {
            run_ok(std::process::Command::new("kill").args(["-STOP", &pid.to_string()]))?;
            return Ok(*pid);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("no {comm} ran in {node} within {timeout:?}")
}

/// The job marker the agent writes beside the data directory.
const JOB_MARKER: &str = "/var/lib/pgha/data.pgha-job";

fn marker_of(cluster: &Cluster, node: &str) -> Option<String> {
    run_ok(&mut crate::cluster::docker(&[
        "exec",
        cluster.container(node),
        "cat",
        JOB_MARKER,
    ]))
    .ok()
}

impl CutShort {
    /// The job's name in the agent's log (`job=Rewind`).
    fn marker_job(&self) -> &'static str {
        if self.marker == "rewind" {
            "Rewind"
        } else {
            "Clone"
        }
    }
}

/// `docker stop` (SIGINT) of every node at once, the frozen job `frozen`
/// let go on (SIGCONT) once the agents have the signal, then `docker start`.
fn stop_and_start_all(cluster: &Cluster, frozen: u32) -> Result<()> {
    std::thread::scope(|s| {
        let stops: Vec<_> = NODES
            .iter()
            .map(|n| s.spawn(move || cluster.docker_on(&["stop", "-t", "60"], n)))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let resumed =
            run_ok(std::process::Command::new("kill").args(["-CONT", &frozen.to_string()]));
        stops
            .into_iter()
            .try_for_each(|k| k.join().expect("stop thread").map(|_| ()))?;
        resumed.map(|_| ())
    })?;
    start_all(cluster)
}

fn start_all(cluster: &Cluster) -> Result<()> {
    std::thread::scope(|s| {
        let starts: Vec<_> = NODES
            .iter()
            .map(|n| s.spawn(move || cluster.docker_on(&["start"], n)))
            .collect();
        starts
            .into_iter()
            .try_for_each(|k| k.join().expect("start thread").map(|_| ()))
    })
}

/// `docker kill` of every node at once (threads), then `docker start` of all.
fn kill_and_start_all(cluster: &Cluster) -> Result<()> {
    std::thread::scope(|s| {
        let kills: Vec<_> = NODES
            .iter()
            .map(|n| s.spawn(move || cluster.docker_on(&["kill"], n)))
            .collect();
        kills
            .into_iter()
            .try_for_each(|k| k.join().expect("kill thread").map(|_| ()))
    })?;
    start_all(cluster)
}

/// The compose log of one node (the agent logs to stdout).
fn node_log(cluster: &Cluster, node: &str, tail: usize) -> String {
    let out = crate::cluster::run(&mut cluster.compose(&[
        "logs",
        "--no-color",
        "--tail",
        &tail.to_string(),
        node,
    ]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A rewind or a clone caught part way by a whole-cluster stop.
struct CutShort {
    /// The process frozen, and the word of the marker it runs under.
    program: &'static str,
    marker: &'static str,
    /// What the agent logs when it finds the marker after the restart.
    logged: &'static str,
    /// SIGINT to every node with the job let go on (the agent waits for it
    /// within shutdown_timeout); else SIGKILL with the job frozen.
    sigint: bool,
}

fn stop_all_during_rewind(cluster: &Cluster) -> Result<Injected> {
    all_during_rewind(cluster, true)
}

fn kill_all_during_rewind(cluster: &Cluster) -> Result<Injected> {
    all_during_rewind(cluster, false)
}

fn all_during_rewind(cluster: &Cluster, sigint: bool) -> Result<Injected> {
    let p = primary_now(cluster)?;
    cluster.docker_on(&["kill"], &p)?;
    let np = new_primary(cluster, &p, Duration::from_secs(60))?;
    let note = format!("{p} killed, {np} promoted");
    // The old primary rewinds before it follows: catch pg_rewind running.
    cluster.docker_on(&["start"], &p)?;
    let job = CutShort {
        program: "pg_rewind",
        marker: "rewind",
        logged: "the last pg_rewind did not finish",
        sigint,
    };
    let mut inj = stop_all_during(cluster, &p, &job)?;
    inj.notes.insert(0, note);
    Ok(inj)
}

fn stop_all_during_clone(cluster: &Cluster) -> Result<Injected> {
    let r = wipe_a_replica(cluster)?;
    let job = CutShort {
        program: "pg_basebackup",
        marker: "clone",
        logged: "an interrupted clone left a partial copy",
        sigint: true,
    };
    stop_all_during(cluster, r, &job)
}

/// Freezes `job` on `node`, kills and starts every node, and checks that
/// `node` never runs Postgres on the directory its marker names and
/// streams again, the marker gone.
fn stop_all_during(cluster: &Cluster, node: &str, job: &CutShort) -> Result<Injected> {
    let mut inj = Injected::healed();
    let frozen = freeze_in(cluster, node, job.program, Duration::from_secs(60))?;
    match marker_of(cluster, node) {
        Some(m) if m.starts_with(job.marker) => inj.notes.push(format!(
            "{node}'s {} (host PID {frozen}) frozen, marker {m:?}",
            job.program
        )),
        other => inj.violations.push(format!(
            "{node}'s {} runs without a {} marker: {other:?}",
            job.program, job.marker
        )),
    }
    if job.sigint {
        let stopping = Instant::now();
        stop_and_start_all(cluster, frozen)?;
        inj.notes.push(format!(
            "every node stopped by SIGINT ({:.1} s, the job let go on) and started",
            stopping.elapsed().as_secs_f64()
        ));
    } else {
        kill_and_start_all(cluster)?;
        inj.notes.push("every node killed and started".into());
    }
    let mut ran_marked = false;
    let rejoined = wait_for(
        &format!("{node} streaming again"),
        Duration::from_secs(120),
        || {
            // The state first: a marker seen after it was there before.
            let runs = cluster
                .get_json(node, "/patroni")
                .is_some_and(|m| m["state"] == "running" || m["state"] == "streaming");
            ran_marked |= runs && marker_of(cluster, node).is_some();
            cluster
                .answers_200(node, "/replica?replication_state=streaming")
                .then_some(())
        },
    );
    if let Err(e) = rejoined {
        inj.violations.push(format!("{e:#}"));
    }
    if ran_marked {
        inj.violations.push(format!(
            "{node} ran Postgres while its {} marker was there",
            job.marker
        ));
    }
    if let Some(m) = marker_of(cluster, node) {
        inj.violations
            .push(format!("{node}'s marker outlived its job: {m:?}"));
    }
    let log = node_log(cluster, node, 4000);
    if job.sigint {
        // Finished, failed (its source stopped too) or cancelled: said.
        let said = log
            .lines()
            .find(|l| l.contains("stopping: the job") && l.contains(job.marker_job()));
        match said {
            Some(line) => inj.notes.push(format!(
                "{node}: {}",
                line.split("stopping: ").nth(1).unwrap_or(line).trim()
            )),
            None => inj.violations.push(format!(
                "{node}'s log does not say how its {} ended on SIGINT",
                job.program
            )),
        }
    } else if !log.contains(job.logged) {
        inj.violations
            .push(format!("{node}'s log does not say {:?}", job.logged));
    }
    inj.healed_at = Instant::now();
    Ok(inj)
}
