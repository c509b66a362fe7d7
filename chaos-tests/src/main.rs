//! `chaos-tests run [--scenario NAME]... [--repeat N] [--sync on|off]`: brings
//! up the compose cluster, runs the chosen scenarios and prints the table.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use chaos_tests::suite::{self, Options};

#[derive(Parser)]
#[command(
    name = "chaos-tests",
    about = "Fault injection against a real pgha cluster in containers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs scenarios (all implemented ones unless --scenario is given).
    Run {
        /// A scenario's name or number; repeatable.
        #[arg(long = "scenario")]
        scenarios: Vec<String>,
        /// How many times each scenario runs.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// synchronous_mode of the cluster: on, off, strict or quorum.
        #[arg(long, default_value = "on")]
        sync: String,
        /// Lease TTL in seconds (loop_wait 1 s, retry_timeout 2 s).
        #[arg(long, default_value_t = 5)]
        ttl: u64,
    },
    /// Lists the scenarios.
    List,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::List => {
            for s in chaos_tests::scenarios::all() {
                println!("{:>2} {:<24} {}", s.number, s.name, s.summary);
            }
            for (n, name) in chaos_tests::scenarios::MISSING {
                println!("{n:>2} {name:<24} (not implemented)");
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            scenarios,
            repeat,
            sync,
            ttl,
        } => {
            let opts = Options {
                scenarios,
                repeat,
                sync,
                ttl,
            };
            match suite::run(&opts) {
                Ok(outcome) if outcome.passed() => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("chaos-tests: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
