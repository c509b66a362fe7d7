//! `chaos-tests run [--scenario NAME]... [--repeat N] [--sync on|off]`: brings
//! up the compose cluster, runs the chosen scenarios and prints the table;
//! `chaos-tests netem` runs the tc-netem stand-in by hand.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use chaos_tests::netem::{self, Netem, NetemThread};
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
    /// Delays (and drops a share of) the packets iptables sends to an
    /// NFQUEUE, inside the network namespace of a process: a stand-in for
    /// `tc netem` where the kernel has no sch_netem. The rules are yours to
    /// add and remove, e.g. `iptables -I OUTPUT ! -o lo -j NFQUEUE
    /// --queue-num 11 --queue-bypass` under `nsenter -t PID -n`.
    Netem {
        /// A process in the network namespace to serve (a container's PID 1).
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 11)]
        queue: u16,
        /// Delay of every accepted packet, in milliseconds.
        #[arg(long, default_value_t = 200)]
        delay_ms: u64,
        /// Share of packets dropped, 0 to 1.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// How long to serve before unbinding.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Netem {
            pid,
            queue,
            delay_ms,
            loss,
            seconds,
        } => {
            let netem = Netem {
                queue,
                delay: Duration::from_millis(delay_ms),
                loss,
                seed: netem::clock_seed(),
            };
            eprintln!("chaos-tests netem: {netem:?} in the network namespace of PID {pid}");
            let run = NetemThread::start(pid, netem).and_then(|mut t| {
                std::thread::sleep(Duration::from_secs(seconds));
                t.stop_now()
            });
            match run {
                Ok(stats) => {
                    eprintln!("chaos-tests netem: {stats:?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("chaos-tests netem: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::List => {
            for s in chaos_tests::scenarios::all() {
                let ci = if chaos_tests::scenarios::NOT_IN_CI
                    .iter()
                    .any(|(n, _)| *n == s.number)
                {
                    " (not in CI)"
                } else {
                    ""
                };
                println!("{:>2} {:<28} {}{ci}", s.number, s.name, s.summary);
            }
            for (n, name) in chaos_tests::scenarios::MISSING {
                println!("{n:>2} {name:<28} (not implemented)");
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
