//! What `cargo test --workspace` runs of the chaos suite: every implemented
//! scenario once, in synchronous mode `on`, on one compose cluster. Passing
//! bar: zero acknowledged writes lost, zero split-brain events, every
//! scenario converged. Skipped, with a message, when no Docker engine answers.

use chaos_tests::suite::{self, Options, Outcome};

#[test]
fn every_scenario_once_in_synchronous_mode() {
    let opts = Options {
        scenarios: Vec::new(),
        repeat: 1,
        sync: "on".into(),
        ttl: 5,
    };
    match suite::run(&opts).expect("chaos suite") {
        Outcome::Skipped => {}
        Outcome::Ran(results) => {
            let failed: Vec<String> = results
                .iter()
                .filter(|r| !r.passed())
                .map(|r| format!("{} #{}: {:?}", r.scenario, r.repeat, r.violations))
                .collect();
            assert!(
                failed.is_empty(),
                "scenarios failed:\n{}",
                failed.join("\n")
            );
        }
    }
}
