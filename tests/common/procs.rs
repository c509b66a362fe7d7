//! What the benchmarks read off this machine: processes' memory and CPU
//! from /proc, and the machine itself.

use std::collections::HashMap;
use std::fs;
use std::process::Command;

/// Processes of one agent: the agent and its descendants running the same
/// executable (pgha's fence guard; Postgres is not counted).
pub fn agent_tree(agent: i32) -> Vec<i32> {
    let exe = |pid: i32| fs::read_link(format!("/proc/{pid}/exe")).ok();
    let Some(agent_exe) = exe(agent) else {
        return vec![agent];
    };
    let mut parent_of = HashMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse::<i32>().ok()) {
            parent_of.insert(pid, ppid);
        }
    }
    let mut tree = vec![agent];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for (&pid, &ppid) in &parent_of {
            if ppid == parent && !tree.contains(&pid) {
                tree.push(pid);
            }
        }
        i += 1;
    }
    tree.into_iter()
        .filter(|&p| p == agent || exe(p).as_ref() == Some(&agent_exe))
        .collect()
}

/// Fields of /proc/PID/stat after the command name: [state, ppid, ...].
pub fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of `pid`, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    stat_fields(pid)
        .map(|f| {
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// The `KEY:   N kB` line of a /proc file, in KiB; 0 when absent.
fn kib_line(path: &str, key: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

pub fn rss_kib(pid: i32) -> u64 {
    kib_line(&format!("/proc/{pid}/status"), "VmRSS")
}

/// Proportional set size: every page shared with other processes (the
/// binary's text between the agent and its guard, libc, libpython) counted
/// as its share only.
pub fn pss_kib(pid: i32) -> u64 {
    kib_line(&format!("/proc/{pid}/smaps_rollup"), "Pss")
}

pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("({cmd}: {e})"))
}

/// The first three fields of /proc/loadavg.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn memory_gib() -> f64 {
    kib_line("/proc/meminfo", "MemTotal") as f64 / 1024.0 / 1024.0
}
