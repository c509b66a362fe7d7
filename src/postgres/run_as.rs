//! Who the Postgres tools run as: the agent itself, or (when the agent runs
//! as root) `postgresql.os_user`. Shared by Postgres' own programs and the
//! tools that read its data directory (pgBackRest).

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

use nix::unistd::User;
use tokio::process::Command;

/// uid/gid a child runs as; `None`: as the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs(Option<(u32, u32)>);

impl RunAs {
    /// `os_user` when the agent is root, else the agent's own user.
    pub fn for_user(os_user: &str) -> Result<RunAs, String> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(RunAs(None));
        }
        let user = User::from_name(os_user)
            .map_err(|e| format!("looking up OS user {os_user}: {e}"))?
            .ok_or_else(|| format!("OS user {os_user} (postgresql.os_user) does not exist"))?;
        Ok(RunAs(Some((user.uid.as_raw(), user.gid.as_raw()))))
    }

    /// `program` as that user, with a C.UTF-8 locale, no PGPASSWORD, stdin
    /// closed, killed when dropped.
    pub fn command(&self, program: &Path) -> Command {
        let mut std_cmd = std::process::Command::new(program);
        if let Some((uid, gid)) = self.0 {
            std_cmd.uid(uid).gid(gid);
            // libpq looks for ~/.postgresql/postgresql.crt when TLS is on: as
            // the Postgres user, root's HOME is unreadable and fails the connection.
            if let Ok(Some(user)) = User::from_uid(uid.into()) {
                std_cmd.env("HOME", user.dir);
            }
        }
        std_cmd
            .env("LC_ALL", "C.UTF-8")
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null());
        let mut cmd = Command::from(std_cmd);
        cmd.kill_on_drop(true);
        cmd
    }

    /// Gives `path` to that user (nothing to do when it is the agent's).
    pub fn chown(&self, path: &Path) -> io::Result<()> {
        match self.0 {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }
}
