//! PID 1 duties for `pgha run` as a container's entrypoint. A process with
//! PID 1 inherits every orphan in its PID namespace and gets no default signal
//! dispositions, so the agent splits in two: this process stays PID 1, reaps
//! every child that exits and forwards termination signals, while the agent
//! proper runs as its child (the same binary and arguments) and keeps sole
//! ownership of the exit statuses of its own children (Postgres, the fence
//! guard, pg_basebackup, ...), which tokio collects per process.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

/// True when this process is the init process of its PID namespace.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Signals PID 1 passes on to the agent. SIGINT is the platform's kill
/// signal (graceful handover), SIGTERM Docker's default.
const FORWARDED: [(SignalKind, Signal); 6] = [
    (SignalKind::interrupt(), Signal::SIGINT),
    (SignalKind::terminate(), Signal::SIGTERM),
    (SignalKind::hangup(), Signal::SIGHUP),
    (SignalKind::quit(), Signal::SIGQUIT),
    (SignalKind::user_defined1(), Signal::SIGUSR1),
    (SignalKind::user_defined2(), Signal::SIGUSR2),
];

/// What reaping saw: the agent's exit code once it has exited.
#[derive(Debug, PartialEq, Eq)]
pub enum Reaped {
    AgentRunning { orphans: usize },
    AgentExited { code: u8, orphans: usize },
}

/// Reaps every exited child without blocking. `agent` is the one child whose
/// status matters; every other child is an orphan adopted by PID 1.
pub fn reap(agent: Pid) -> Reaped {
    let mut orphans = 0;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => {
                return Reaped::AgentExited {
                    code: u8::try_from(code).unwrap_or(1),
                    orphans,
                };
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == agent => {
                // The shell convention: 128 + signal number.
                return Reaped::AgentExited {
                    code: 128u8.saturating_add(sig as u8),
                    orphans,
                };
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => {
                return Reaped::AgentRunning { orphans };
            }
            Ok(_) => orphans += 1,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "waitpid failed");
                return Reaped::AgentRunning { orphans };
            }
        }
    }
}

/// Runs the agent as a child of this PID 1 with the same arguments, reaps
/// orphans and forwards signals until the agent exits; returns its exit code.
pub async fn supervise(args: Vec<OsString>) -> ExitCode {
    // Handlers first, so no signal arriving during the spawn is lost.
    let (forward_tx, mut forward) = tokio::sync::mpsc::unbounded_channel();
    for (kind, sig) in FORWARDED {
        let mut stream = match signal(kind) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::error!(signal = %sig, error = %e, "cannot handle signal");
                return ExitCode::from(1);
            }
        };
        let tx = forward_tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        });
    }
    let mut children = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGCHLD");
            return ExitCode::from(1);
        }
    };
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let agent = match std::process::Command::new(&exe).args(args).spawn() {
        // The std handle is dropped without waiting: reap() collects it.
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => {
            tracing::error!(exe = %exe.display(), error = %e, "cannot start the agent");
            return ExitCode::from(1);
        }
    };
    tracing::info!(agent_pid = %agent, "running as PID 1: the agent runs as a child, orphans are reaped here");

    loop {
        match reap(agent) {
            Reaped::AgentExited { code, orphans } => {
                if orphans > 0 {
                    tracing::debug!(orphans, "reaped orphaned processes");
                }
                tracing::info!(code, "agent exited");
                return ExitCode::from(code);
            }
            Reaped::AgentRunning { orphans } if orphans > 0 => {
                tracing::debug!(orphans, "reaped orphaned processes");
            }
            Reaped::AgentRunning { .. } => {}
        }
        tokio::select! {
            Some(sig) = forward.recv() => {
                tracing::info!(signal = %sig, "forwarding signal to the agent");
                if let Err(e) = kill(agent, sig) {
                    tracing::warn!(signal = %sig, error = %e, "cannot forward signal");
                }
            }
            _ = children.recv() => {}
            // SIGCHLD coalesces; a periodic pass makes sure nothing lingers.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
