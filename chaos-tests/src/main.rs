//! Fault-injection suite for pgha. The scenarios, workload and checker arrive
//! with the chaos issue; this crate only reserves its place in the workspace.

fn main() {
    eprintln!("chaos-tests: no scenarios yet (see the chaos-tests issue)");
    std::process::exit(2);
}
