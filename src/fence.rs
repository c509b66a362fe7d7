//! The fence guard: a small process, separate from the agent, that stops the
//! local primary when the agent can no longer vouch for its lease. The agent
//! feeds it the fencing deadline after every renewal. If the agent dies (its
//! end of the pipe closes) the guard stops Postgres at once; if the agent
//! stops feeding it (frozen, SIGSTOPped, stuck on I/O) the guard stops
//! Postgres at the deadline. It runs synchronous std code: no runtime that a
//! stall in the agent could hold up.
//!
//! Protocol, one line per message on the guard's stdin: `arm MS` (stop the
//! postmaster unless re-armed within MS milliseconds) and `disarm`. The guard
//! reads the postmaster's PID from `postmaster.pid` when it fires, so a
//! Postgres restarted since the last message is covered too.

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A parsed guard message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Arm { within: Duration },
    Disarm,
}

pub fn parse(line: &str) -> Option<Message> {
    let mut words = line.split_whitespace();
    match words.next()? {
        "arm" => {
            let ms: u64 = words.next()?.parse().ok()?;
            Some(Message::Arm {
                within: Duration::from_millis(ms),
            })
        }
        "disarm" => Some(Message::Disarm),
        _ => None,
    }
}

/// Immediate shutdown: the postmaster stops every backend and exits without
/// a checkpoint, so no session keeps writing.
fn stop_postmaster(target: &dyn Fn() -> Option<i32>, why: &str) {
    match target() {
        Some(pid) => {
            let r = kill(Pid::from_raw(pid), Signal::SIGQUIT);
            eprintln!("pgha fence-guard: {why}: sent SIGQUIT to postmaster {pid}: {r:?}");
        }
        None => eprintln!("pgha fence-guard: {why}: no postmaster running"),
    }
}

/// PID of the postmaster of `data_dir`, from its postmaster.pid.
pub fn postmaster_pid(data_dir: &std::path::Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// The guard's main loop; `target` names the process to stop. Returns when
/// the agent is gone.
pub fn run_guard(input: impl BufRead + Send + 'static, target: &dyn Fn() -> Option<i32>) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in input.lines() {
            let Ok(line) = line else { break };
            if let Some(m) = parse(&line) {
                if tx.send(m).is_err() {
                    break;
                }
            }
        }
        // Dropping tx tells the main loop the agent is gone.
    });
    let mut armed: Option<Instant> = None;
    loop {
        let msg = match armed {
            Some(deadline) => rx.recv_timeout(deadline.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match msg {
            Ok(Message::Arm { within }) => armed = Some(Instant::now() + within),
            Ok(Message::Disarm) => armed = None,
            Err(RecvTimeoutError::Timeout) => {
                if armed.take().is_some() {
                    stop_postmaster(
                        target,
                        "fencing deadline passed without renewal from the agent",
                    );
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                if armed.is_some() {
                    stop_postmaster(target, "agent gone while it held the leader lease");
                }
                return;
            }
        }
    }
}

/// The agent's handle on its guard process.
pub struct Guard {
    child: Child,
    stdin: ChildStdin,
}

impl Guard {
    /// Starts `pgha fence-guard --data-dir DIR` from the agent's own executable.
    pub fn spawn(data_dir: &std::path::Path) -> std::io::Result<Guard> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("fence-guard")
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Its own process group: a Ctrl-C meant for the agent must not kill it.
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        Ok(Guard { child, stdin })
    }

    pub fn send(&mut self, m: Message) -> std::io::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(std::io::Error::other(format!(
                "fence guard exited: {status}"
            )));
        }
        let line = match m {
            Message::Arm { within } => format!("arm {}\n", within.as_millis()),
            Message::Disarm => "disarm\n".to_string(),
        };
        self.stdin.write_all(line.as_bytes())?;
        self.stdin.flush()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.send(Message::Disarm);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse() {
        assert_eq!(
            parse("arm 8000"),
            Some(Message::Arm {
                within: Duration::from_secs(8)
            })
        );
        assert_eq!(parse("disarm"), Some(Message::Disarm));
        assert_eq!(parse("arm x"), None);
        assert_eq!(parse("bogus"), None);
    }

    /// A stand-in for the postmaster that dies of SIGQUIT even when the
    /// test runs with SIGQUIT ignored (a shell's background job inherits
    /// that, and `sleep` would keep it).
    fn sleeper() -> std::process::Child {
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import signal, time; signal.signal(signal.SIGQUIT, signal.SIG_DFL); print('ready', flush=True); time.sleep(30)",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        // Only once its handler is set may the guard fire at it.
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("ready line");
        assert_eq!(line.trim(), "ready");
        child
    }

    #[test]
    fn guard_stops_the_process_at_the_deadline() {
        let mut victim = sleeper();
        let (r, mut w) = std::io::pipe().expect("pipe");
        let pid = victim.id() as i32;
        let guard =
            std::thread::spawn(move || run_guard(std::io::BufReader::new(r), &move || Some(pid)));
        writeln!(w, "arm 200").unwrap();
        let started = Instant::now();
        let status = victim.wait().unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "stopped too early"
        );
        assert!(!status.success());
        drop(w);
        guard.join().unwrap();
    }

    #[test]
    fn rearming_keeps_it_running_and_disarm_spares_it() {
        let mut victim = sleeper();
        let (r, mut w) = std::io::pipe().expect("pipe");
        let pid = victim.id() as i32;
        let guard =
            std::thread::spawn(move || run_guard(std::io::BufReader::new(r), &move || Some(pid)));
        for _ in 0..5 {
            writeln!(w, "arm 300").unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            victim.try_wait().unwrap().is_none(),
            "re-armed guard must not fire"
        );
        writeln!(w, "disarm").unwrap();
        drop(w);
        guard.join().unwrap();
        assert!(
            victim.try_wait().unwrap().is_none(),
            "a disarmed guard leaves postgres alone when the agent exits"
        );
        victim.kill().unwrap();
        victim.wait().unwrap();
    }

    #[test]
    fn agent_death_fires_an_armed_guard_at_once() {
        let mut victim = sleeper();
        let (r, mut w) = std::io::pipe().expect("pipe");
        let pid = victim.id() as i32;
        let guard =
            std::thread::spawn(move || run_guard(std::io::BufReader::new(r), &move || Some(pid)));
        writeln!(w, "arm 60000").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        drop(w);
        victim.wait().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        guard.join().unwrap();
    }
}
