//! The `pgha` binary: the fence guard's fast path, else parse the command
//! line and hand over to the library (`pgha::cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The fence guard is plain synchronous code started by the agent with
    // exactly these arguments: no argument parser, no runtime, no worker
    // threads, the smallest footprint beside every primary.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let [cmd, flag, data_dir] = args.as_slice() {
        if cmd == "fence-guard" && flag == "--data-dir" {
            let data_dir = PathBuf::from(data_dir);
            let stdin = std::io::BufReader::new(std::io::stdin());
            pgha::fence::run_guard(stdin, &move || pgha::fence::postmaster_pid(&data_dir));
            return ExitCode::SUCCESS;
        }
    }
    let cli = pgha::cli::Cli::parse();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(cli.dispatch()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}
