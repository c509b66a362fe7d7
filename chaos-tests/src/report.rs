//! The results table: per scenario, RTO median and max over every writer of
//! every repeat, acknowledged writes lost, split-brain events, promotions and
//! convergence; printed, and written as Markdown and JSON under
//! chaos-tests/results/.

use std::path::PathBuf;

use serde::Serialize;

use crate::check::RunResult;

#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: String,
    pub runs: usize,
    pub rto_median_ms: Option<u64>,
    pub rto_max_ms: Option<u64>,
    pub acked: usize,
    pub unknown: usize,
    pub lost: usize,
    pub split_brain_events: usize,
    pub promotions: usize,
    pub converged: usize,
    pub converge_max_ms: Option<u64>,
    pub passed: bool,
}

pub fn rows(results: &[RunResult]) -> Vec<Row> {
    let mut names: Vec<&str> = Vec::new();
    for r in results {
        if !names.contains(&r.scenario.as_str()) {
            names.push(&r.scenario);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let runs: Vec<&RunResult> = results.iter().filter(|r| r.scenario == name).collect();
            let mut rtos: Vec<u64> = runs
                .iter()
                .flat_map(|r| r.writers.iter().filter_map(|w| w.rto_ms))
                .collect();
            rtos.sort_unstable();
            Row {
                scenario: name.to_string(),
                runs: runs.len(),
                rto_median_ms: rtos.get(rtos.len() / 2).copied(),
                rto_max_ms: rtos.last().copied(),
                acked: runs.iter().flat_map(|r| &r.writers).map(|w| w.acked).sum(),
                unknown: runs
                    .iter()
                    .flat_map(|r| &r.writers)
                    .map(|w| w.unknown)
                    .sum(),
                lost: runs.iter().map(|r| r.lost).sum(),
                split_brain_events: runs.iter().map(|r| r.split_brain_events).sum(),
                promotions: runs.iter().map(|r| r.promotions).sum(),
                converged: runs.iter().filter(|r| r.converged).count(),
                converge_max_ms: runs.iter().filter_map(|r| r.converged_after_ms).max(),
                passed: runs.iter().all(|r| r.passed()),
            }
        })
        .collect()
}

fn secs(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |m| format!("{:.2}", m as f64 / 1000.0))
}

pub fn markdown(results: &[RunResult], header: &str) -> String {
    let mut md = format!(
        "{header}\n\n| scenario | runs | RTO median s | RTO max s | acked | unknown | acked lost | split-brain events | promotions | converged | converge max s | passed |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for r in rows(results) {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} |\n",
            r.scenario,
            r.runs,
            secs(r.rto_median_ms),
            secs(r.rto_max_ms),
            r.acked,
            r.unknown,
            r.lost,
            r.split_brain_events,
            r.promotions,
            r.converged,
            r.runs,
            secs(r.converge_max_ms),
            if r.passed { "yes" } else { "NO" }
        ));
    }
    let failures: Vec<&RunResult> = results.iter().filter(|r| !r.passed()).collect();
    if !failures.is_empty() {
        md.push_str("\nViolations:\n\n");
        for r in failures {
            for v in &r.violations {
                md.push_str(&format!("- {} #{}: {v}\n", r.scenario, r.repeat));
            }
        }
    }
    md
}

pub fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}

/// Writes `<stem>.md` and `<stem>.json` under chaos-tests/results/.
pub fn write(results: &[RunResult], header: &str, stem: &str) -> std::io::Result<PathBuf> {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{stem}.md")), markdown(results, header))?;
    let json = serde_json::json!({
        "header": header,
        "table": rows(results),
        "runs": results,
    });
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&json).unwrap(),
    )?;
    Ok(dir.join(format!("{stem}.md")))
}
